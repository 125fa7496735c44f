"""Where a model runs and how long a call on it takes, queued GPU work included.

Low-level on purpose: the benchmark, latency budgets and the report all time or place tensors with these.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def cuda_devices(model: nn.Module) -> list[torch.device]:
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def synchronize(model: nn.Module) -> None:
    """Wait for queued GPU work, or a timer measures only the kernel launches."""
    for device in cuda_devices(model):
        torch.cuda.synchronize(device)


def timed(model: nn.Module, fn: Callable[[], object]) -> float:
    """Seconds fn() takes, its queued GPU work included."""
    synchronize(model)
    start = time.perf_counter()
    fn()
    synchronize(model)
    return time.perf_counter() - start
