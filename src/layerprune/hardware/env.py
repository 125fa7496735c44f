"""The environment report behind `layerprune env`: what a bug report needs, in one dict.

Most "it is slow" or "it fails" reports come down to a package version, a CPU that only emulates bf16, a
GPU without bf16, too little memory, or an environment variable (offline mode, a lowered CPU ISA). The
report gathers these without importing the optional packages (importing them is slow and can fail in the
very environment being reported); torch is the exception, as the CPU and GPU facts come from it.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
from pathlib import Path

from layerprune.files.cache import cache_dir
from layerprune.hardware import compute

PACKAGES = ("torch", "transformers", "peft", "lm_eval", "accelerate", "datasets", "safetensors", "gguf",
            "bitsandbytes", "trl")
ENV_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "LAYERPRUNE_CACHE", "HF_HOME", "CUDA_VISIBLE_DEVICES",
            "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OMP_NUM_THREADS")
_GIB = 1024**3


def environment_report() -> dict:
    """Versions, CPU, GPUs, memory, cache and the environment variables that change behaviour (JSON-able)."""
    import torch  # noqa: PLC0415  (start-up: `layerprune env --help` does not load torch)

    return {
        "layerprune": package_version("layerprune"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "cpu": cpu_report(),
        "gpus": gpu_report(),
        "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()),
        "memory": memory_report(),
        "cache": cache_report(),
        "env_vars": {name: os.environ[name] for name in ENV_VARS if name in os.environ},
    }


def package_version(name: str) -> str | None:
    """The installed distribution's version from its metadata (never imports it); None when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_report() -> dict:
    """The CPU facts that decide the compute dtype: bf16 is only fast where AVX512-BF16 or AMX computes it."""
    flags = compute.cpu_flags()
    has_bf16_flags = any(flag in flags for flag in compute.NATIVE_BF16_FLAGS)
    return {
        "model": compute.cpu_model_name(),
        "cores": os.cpu_count(),
        "isa": compute.isa_names(flags),
        "torch_capability": compute.torch_cpu_capability(),
        "native_bf16": bool(compute.cpu_native_bf16()),
        "native_fp16": bool(compute.cpu_native_fp16()),
        # the timed probe only where the flags make native bf16 possible: elsewhere it is known emulated
        "bf16_matmul_ratio": round(compute.bf16_matmul_ratio(), 2) if has_bf16_flags else None,
        "compute": compute.compute_choice("cpu").to_json(),
    }


def gpu_report() -> list[dict]:
    """One entry per visible CUDA device (empty without CUDA): name, total memory, bf16, compute capability."""
    import torch

    if not torch.cuda.is_available():
        return []
    gpus = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        with torch.cuda.device(index):
            bf16 = bool(torch.cuda.is_bf16_supported())
        gpus.append({"name": props.name, "memory_gib": round(props.total_memory / _GIB, 1), "bf16": bf16,
                     "capability": f"{props.major}.{props.minor}"})
    return gpus


def memory_report(meminfo: str | None = None) -> dict:
    """Total and available RAM in GiB from /proc/meminfo (no psutil dependency); None where unreadable."""
    if meminfo is None:
        try:
            meminfo = Path("/proc/meminfo").read_text(errors="replace")
        except OSError:
            meminfo = ""
    values = {}
    for line in meminfo.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if key in ("MemTotal", "MemAvailable") and parts and parts[0].isdigit():
            values[key] = round(int(parts[0]) * 1024 / _GIB, 1)  # /proc/meminfo counts kB
    return {"total_gib": values.get("MemTotal"), "available_gib": values.get("MemAvailable")}


def cache_report() -> dict:
    """Where models are cached and how much disk is free there (the cache may not exist yet: its nearest
    existing parent is on the same disk, usually)."""
    path = cache_dir()
    existing = path.expanduser().absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = round(shutil.disk_usage(existing).free / _GIB, 1)
    except OSError:
        free = None
    return {"path": str(path), "free_gib": free}


def format_report(report: dict) -> list[tuple[str, str]]:
    """The report as (label, value) rows for a two-column table, the packages after the machine."""
    cpu = report["cpu"]
    rows = [("layerprune", _text(report.get("layerprune"))), ("python", report["python"]),
            ("platform", report["platform"]),
            ("cpu", f"{cpu['model']} ({cpu['cores']} cores)"),
            ("cpu ISA", ", ".join(cpu["isa"]) or "none detected"),
            ("torch CPU kernels", _text(cpu.get("torch_capability"))),
            ("native bf16", _yes_no(cpu["native_bf16"]) + _ratio(cpu.get("bf16_matmul_ratio"))),
            ("native fp16", _yes_no(cpu["native_fp16"]))]
    if cpu.get("compute"):
        rows.append(("cpu compute", f"{cpu['compute']['dtype']}: {cpu['compute']['reason']}"))
    rows += _gpu_rows(report.get("gpus") or [], report.get("mps", False))
    memory = report.get("memory") or {}
    rows.append(("memory", f"{_gib(memory.get('total_gib'))} total, {_gib(memory.get('available_gib'))} "
                           "available"))
    cache = report.get("cache") or {}
    rows.append(("cache", f"{cache.get('path')} ({_gib(cache.get('free_gib'))} free)"))
    rows += [(name, _text(version, "not installed")) for name, version in report["packages"].items()]
    rows += [(f"${name}", value) for name, value in (report.get("env_vars") or {}).items()]
    return rows


def _gpu_rows(gpus: list[dict], mps: bool) -> list[tuple[str, str]]:
    """One row per GPU, or one saying there is none (which is what a CPU-only report should say)."""
    rows = [(f"gpu {i}", f"{gpu['name']}, {gpu['memory_gib']} GiB, capability {gpu['capability']}, "
                         f"bf16 {_yes_no(gpu['bf16'])}") for i, gpu in enumerate(gpus)]
    if not gpus:
        rows.append(("gpu", "none (no CUDA device)"))
    if mps:
        rows.append(("mps", "available"))
    return rows


def _yes_no(value) -> str:
    return "yes" if value else "no"


def _ratio(ratio) -> str:
    return "" if ratio is None else f" (bf16 matmul {ratio}x the fp32 time)"


def _gib(value) -> str:
    return "unknown" if value is None else f"{value} GiB"


def _text(value, missing: str = "unknown") -> str:
    return missing if value is None else str(value)
