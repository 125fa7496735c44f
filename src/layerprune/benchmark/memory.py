"""Memory: exact weight bytes, and the peak while a call runs.

Weight bytes are exact (parameters at their dtype, tied weights once; bitsandbytes weights as
packed bytes plus their scales). Peaks are the CUDA max allocated bytes on GPU; on CPU they are
the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs after handing freed
heap back with malloc_trim), falling back to sampling RSS in a thread. The CPU "increase" is a lower
bound: the allocator reuses memory it holds.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from typing import Callable

import torch
from torch import nn

from layerprune.hardware.timing import cuda_devices, synchronize
from layerprune.models.anatomy import parameter_bytes


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS so an RSS increase reflects new allocations (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS. True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def _current_rss() -> int | None:
    rss = _status_kb("VmRSS")
    if rss is not None:
        return rss * 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return None


class _RssSampler:
    """Fallback peak RSS: poll every millisecond in a thread (can miss very short spikes)."""

    def __init__(self) -> None:
        self.peak = _current_rss() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _current_rss() or 0)
            time.sleep(0.001)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss() or 0)


def _cpu_peak(fn: Callable[[], object]) -> dict:
    _trim_heap()
    before = _current_rss()
    if before is None:
        fn()
        return {"peak_bytes": None, "peak_increase_bytes": None, "method": "unavailable (no /proc, no psutil)"}
    if _reset_peak_rss():
        fn()
        peak = _status_kb("VmHWM") * 1024
        method = "CPU peak RSS (VmHWM reset via /proc/self/clear_refs)"
    else:
        with _RssSampler() as sampler:
            fn()
        peak = sampler.peak
        method = "CPU peak RSS (sampled every 1 ms)"
    return {"peak_bytes": peak, "peak_increase_bytes": max(0, peak - before), "method": method}


def _cuda_peak(model: nn.Module, fn: Callable[[], object]) -> dict:
    devices = cuda_devices(model)
    synchronize(model)
    gc.collect()
    before = 0
    for device in devices:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before += torch.cuda.memory_allocated(device)
    fn()
    synchronize(model)
    peak = sum(torch.cuda.max_memory_allocated(d) for d in devices)
    return {"peak_bytes": peak, "peak_increase_bytes": peak - before, "method": "CUDA max allocated"}


def measure_memory(model: nn.Module, fn: Callable[[], object]) -> dict:
    """Peak memory while fn() runs: {'peak_bytes', 'peak_increase_bytes', 'method'}."""
    if cuda_devices(model):
        return _cuda_peak(model, fn)
    return _cpu_peak(fn)


def weight_memory(model: nn.Module) -> dict:
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"weights_bytes": parameter_bytes(model), "buffers_bytes": buffers}
