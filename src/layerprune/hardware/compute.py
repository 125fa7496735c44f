"""One place decides how to compute: bf16, fp16 or fp32, on the device at hand.

bf16 is only a speed-up where the hardware computes it natively. On a CPU that means AVX512-BF16 or AMX;
on an AVX2-only CPU (AMD Zen 2/3, Intel before Cooper Lake, most laptops) torch emulates bf16 and a matmul
runs about 26x slower than in fp32, with no gain in accuracy (held-out perplexity in fp32 and bf16 autocast
agree within 0.2% on SmolLM2). So `auto` picks bf16 on a CPU only when the CPU flags say it is native AND a
tiny timed matmul agrees (the flags can't see `ATEN_CPU_CAPABILITY` / `ONEDNN_MAX_CPU_ISA` limits or a VM
that masks features); the probe runs once per process. On CUDA: bf16 where supported, else fp16.

`decide_compute` is a pure function of (device type, the user's setting, what the hardware supports), so
every rule is tested without the hardware; `compute_choice` feeds it the facts of this machine.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from layerprune.errors import LayerpruneError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# CPU flags (Linux /proc/cpuinfo names) that make a dtype native on the CPU
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
NATIVE_FP16_FLAGS = ("avx512_fp16", "amx_fp16")


@dataclass(frozen=True)
class ComputeChoice:
    """The dtype heavy math runs in (autocast, or the dtype weights are loaded in), and why."""

    dtype: str  # bf16 | fp16 | fp32
    device: str  # cpu | cuda | mps
    reason: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def mixed(self) -> bool:
        """Whether autocast is on (fp32 needs none)."""
        return self.dtype != "fp32"

    def autocast(self):
        """The autocast context of this choice (a no-op for fp32)."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.torch_dtype)

    def describe(self) -> str:
        return f"computing in {self.dtype} on {self.device}: {self.reason}"

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "device": self.device, "reason": self.reason}


def decide_compute(device: str, setting: bool | str | None = "auto", *, cpu_bf16: bool = False,
                   cpu_reason: str | None = None, cuda_bf16: bool = False, mps_bf16: bool = False) -> ComputeChoice:
    """The compute dtype for `device` (cpu | cuda | mps) under the user's `setting`.

    setting: "auto" / None (what the hardware computes natively), True / "bf16" (bf16 autocast, always),
    False / "fp32" (never mixed precision), or "fp16". An explicit setting always wins over the hardware."""
    device = device.split(":")[0]
    if setting is True:
        setting = "bf16"
    elif setting is False:
        setting = "fp32"
    if setting not in (None, "auto", "bf16", "fp16", "fp32"):
        raise LayerpruneError(f"unknown compute setting {setting!r}; choose auto, bf16, fp16 or fp32")
    if setting in ("bf16", "fp16", "fp32"):
        return ComputeChoice(setting, device, "asked for explicitly")
    if device == "cuda":
        if cuda_bf16:
            return ComputeChoice("bf16", device, "this GPU supports bf16")
        return ComputeChoice("fp16", device, "this GPU has no bf16; fp16 mixed precision instead")
    if device == "mps":
        if mps_bf16:
            return ComputeChoice("bf16", device, "this Apple GPU supports bf16")
        return ComputeChoice("fp16", device, "this Apple GPU has no bf16; fp16 mixed precision instead")
    if cpu_bf16:
        return ComputeChoice("bf16", device, cpu_reason or "this CPU computes bf16 natively (AVX512-BF16 or AMX)")
    return ComputeChoice("fp32", device, cpu_reason or "this CPU has no native bf16 (no AVX512-BF16 or AMX), "
                         "where bf16 is emulated and many times slower than fp32")


def compute_choice(device: str | torch.device = "cpu", setting: bool | str | None = "auto") -> ComputeChoice:
    """decide_compute with the facts of this machine (the CPU probe runs once per process, and only when
    the choice depends on it)."""
    device = str(device).split(":")[0]
    cpu_bf16, cpu_reason = False, None
    if device == "cpu" and setting in (None, "auto"):  # only then does the choice depend on the probe
        cpu_bf16, cpu_reason = cpu_bf16_support()
    return decide_compute(
        device, setting, cpu_bf16=cpu_bf16, cpu_reason=cpu_reason,
        cuda_bf16=device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        mps_bf16=device == "mps" and _mps_bf16(),
    )


def frozen_dtype(choice: ComputeChoice, stored: torch.dtype | None) -> torch.dtype:
    """The dtype an adapter's frozen base weights are held in while it trains: the checkpoint's 16-bit dtype
    where healing computes in that dtype (chosen where the device computes it natively, or asked for), as
    peft/trl keep a bf16 base under LoRA; fp32 otherwise (an emulated half type, an fp32 checkpoint, or a
    model whose stored dtype is unknown). The adapters and the optimizer state stay fp32 either way."""
    if stored in (torch.bfloat16, torch.float16) and choice.mixed and choice.torch_dtype == stored:
        return stored
    return torch.float32


def load_dtype(setting: str | torch.dtype, stored: torch.dtype | None, device: str = "cpu") -> tuple[str | torch.dtype, str | None]:
    """The dtype to load weights in for a command that computes with them: `setting` unless it is "auto"
    and the weights are stored in a half type this device only emulates; then fp32, with the reason."""
    if setting != "auto" or stored not in (torch.bfloat16, torch.float16) or str(device).split(":")[0] != "cpu":
        return setting, None
    native = cpu_native_bf16() if stored == torch.bfloat16 else cpu_native_fp16()
    if native:
        return setting, None
    name = "bf16" if stored == torch.bfloat16 else "fp16"
    return torch.float32, f"loading the {name} weights in fp32: this CPU has no native {name}, where it is emulated"


# ---------------------------------------------------------------------------------------------- CPU facts
def cpu_flags(cpuinfo: str | None = None) -> frozenset[str]:
    """The CPU's feature flags as Linux names them (empty where /proc/cpuinfo is not there)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return frozenset()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model_name(cpuinfo: str | None = None) -> str:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            import platform

            return platform.processor() or "unknown"
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            return value.strip()
    return "unknown"


def isa_names(flags: frozenset[str]) -> list[str]:
    """The instruction sets that matter for torch on a CPU, in the words a bug report uses."""
    names = {"avx2": "AVX2", "avx512f": "AVX512", "avx512_bf16": "AVX512-BF16", "avx512_fp16": "AVX512-FP16",
             "amx_bf16": "AMX-BF16", "amx_fp16": "AMX-FP16", "asimd": "NEON", "sve": "SVE"}
    return [name for flag, name in names.items() if flag in flags]


def torch_cpu_capability() -> str:
    """The kernels torch dispatches to on this CPU (ATEN_CPU_CAPABILITY can lower it), e.g. AVX2, AVX512."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return "unknown"


@functools.cache
def cpu_bf16_support() -> tuple[bool, str]:
    """(native, why): bf16 math is native when the flags say so, torch may use its wide kernels, and a tiny
    bf16 matmul is not slower than the fp32 one (an emulated one is 10-200x slower)."""
    if not any(flag in cpu_flags() for flag in NATIVE_BF16_FLAGS):
        return False, "this CPU has no native bf16 (no AVX512-BF16 or AMX), where bf16 is emulated and many " \
                      "times slower than fp32"
    capability = torch_cpu_capability()
    if capability.upper() in ("DEFAULT", "AVX2", "VSX", "ZVECTOR"):
        return False, f"torch runs {capability} kernels here (ATEN_CPU_CAPABILITY?), where bf16 is emulated"
    ratio = bf16_matmul_ratio()
    if ratio >= EMULATED_RATIO:
        return False, f"a bf16 matmul ran {ratio:.0f}x slower than fp32 here (emulated; ONEDNN_MAX_CPU_ISA?)"
    return True, "this CPU computes bf16 natively (AVX512-BF16 or AMX)"


def cpu_native_bf16() -> bool:
    return cpu_bf16_support()[0]


@functools.cache
def cpu_native_fp16() -> bool:
    return any(flag in cpu_flags() for flag in NATIVE_FP16_FLAGS)


# A bf16 matmul this many times slower than fp32 means emulated bf16 (measured 10-200x); native is ~0.4-1x. The
# gap is wide on purpose: on a busy machine a timing can run a few times long, and a native CPU read as
# emulated would compute everything in fp32, several times slower and with other numbers.
EMULATED_RATIO = 4.0


@functools.cache
def bf16_matmul_ratio(rounds: int = 3) -> float:
    """Time of a 64x256 @ 256x512 matmul in bf16 over its time in fp32: the median over `rounds` of the best of 8
    of each, the two dtypes in turn (one burst of other work spoils one round, not the answer)."""
    a = torch.randn(64, 256)
    b = torch.randn(256, 512)
    best_matmul_time(a.bfloat16(), b.bfloat16(), repeats=8)  # oneDNN builds its bf16 kernels on the first calls
    ratios = sorted(best_matmul_time(a.bfloat16(), b.bfloat16(), repeats=8) / max(best_matmul_time(a, b, repeats=8),
                                                                                   1e-9) for _ in range(rounds))
    return ratios[len(ratios) // 2]


def best_matmul_time(a: torch.Tensor, b: torch.Tensor, repeats: int = 24) -> float:
    """Best of `repeats` runs. The first calls of a dtype in a process are slow (oneDNN builds its kernels:
    measured 4-16 ms against 0.06 ms warm, for the first 3-6 calls), so a best of 3 could read a native bf16
    CPU as emulated; 24 runs cost at most ~0.1 s."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return best


def _mps_bf16() -> bool:
    mps = getattr(torch.backends, "mps", None)
    if mps is None or not mps.is_available():
        return False
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
        return True
    except (RuntimeError, TypeError):
        return False


_announced: set[str] = set()


def announce(what: ComputeChoice | str, log=None) -> None:
    """Say once per process what was chosen and why ("computing in fp32 on cpu: this CPU has no ...")."""
    message = what.describe() if isinstance(what, ComputeChoice) else what
    if message not in _announced:
        _announced.add(message)
        (log or _to_stderr)(f"layerprune: {message}")


def _to_stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr)
