"""The devices of this machine and what they hold: GPUs or the CPU with its available memory, whether they compute
bf16 natively, their matmul rate, and memory sizes as users write them (80GB)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field

from layerprune.errors import LayerpruneError
from layerprune.hardware.compute import best_matmul_time, cpu_native_bf16

GiB = 2**30


USABLE = 0.9  # of a device's memory: what the allocator, the CUDA context and the OS leave


RUNTIME_BYTES = int(0.45 * 2**30)  # Python + torch + transformers imported (bench/scale_rehearsal.py: 0.39 GiB)


@dataclass(frozen=True)
class Devices:
    kind: str  # "cpu" or "cuda"
    count: int
    memory: int  # bytes per device (the CPU: available RAM)
    bf16: bool = True  # computes bf16 natively (a CPU without AVX512-BF16/AMX: fp32)

    @property
    def compute_bytes(self) -> int:
        return 2 if self.bf16 or self.kind == "cuda" else 4

    def describe(self) -> str:
        size = f"{self.memory / GiB:.0f} GiB"
        return f"{self.count} x GPU {size}" if self.kind == "cuda" else f"CPU, {size} available"


@dataclass
class StageMemory:
    stage: str
    bytes_per_device: int
    detail: str
    fits: bool = True
    settings: dict = field(default_factory=dict)


def runtime_bytes(devices: Devices) -> int:
    """Host memory of the interpreter with torch and transformers imported (counted on a CPU only)."""
    return RUNTIME_BYTES if devices.kind == "cpu" else 0


def parse_memory(text: str) -> int:
    """'80GB', '24 GiB', '512MB' -> bytes (GB and GiB both read as 2**30: how GPU memory is quoted)."""
    import re

    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([KMGT]i?B?)?\s*", str(text), flags=re.I)
    if not match or not 0 < float(match.group(1)) < 1e6:  # "1.2.3GB", "0GB", a number of 400 digits
        raise LayerpruneError(f"cannot read the memory size {text!r}; write a positive size such as 80GB")
    unit = (match.group(2) or "G").upper()[0]
    return int(float(match.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


GPU_FLOPS = 0.4 * 400e12


def this_machine() -> Devices:
    """The GPUs here (the first one's memory, times their count), else the CPU with its available memory."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return Devices("cuda", torch.cuda.device_count(), props.total_memory, torch.cuda.is_bf16_supported())
    return Devices("cpu", 1, available_memory_bytes() or 0, cpu_native_bf16())


def device_flops(devices: Devices) -> tuple[float, str]:
    """Floating-point operations per second of the devices, and where the number comes from."""
    if devices.kind == "cuda":
        return GPU_FLOPS * devices.count, f"nominal {GPU_FLOPS / 1e12:.0f} TFLOPS per GPU"
    import torch

    dtype = torch.bfloat16 if devices.bf16 else torch.float32
    a, b = torch.randn(256, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    best = best_matmul_time(a, b, repeats=8)  # warm kernels: the first calls of a dtype are slow
    return 2 * 256 * 1024 * 1024 / max(best, 1e-9) * 0.5, "this CPU's matmul rate, halved for a whole model"


def training_device() -> str:
    """Where healing computes: this process's GPU where CUDA is available (LOCAL_RANK's under a launcher, where
    the Trainer places the model), else the CPU."""
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def fsdp_launched() -> bool:
    """Whether accelerate launched this process with FSDP (it shards the model itself: nothing moves it whole)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")


def device_memory_bytes(device: str) -> int | None:
    """Memory a model loaded on `device` can use: a GPU's total, the CPU's available RAM (None when unknown)."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return available_memory_bytes()


def release_memory() -> None:
    """Give back what freed models held: Python's garbage, and the CUDA allocator's cached blocks (so the next
    model's load sees the whole GPU, and so does nvidia-smi)."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (psutil where there is no /proc); None when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return None
