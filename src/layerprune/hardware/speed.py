"""How fast this machine runs a model: a timed forward (tokens per second), and time in words."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from layerprune.common.units import format_seconds

GENERATED_TOKEN_COST = 6.0


@dataclass(frozen=True)
class Speed:
    """Seconds per token of one model here: batched forward, and one generated token."""

    forward: float
    decode: float
    compute: str = "fp32"

    def scaled(self, fraction: float) -> "Speed":
        """The speed of a model doing `fraction` of this one's work per token (a pruned copy)."""
        return Speed(self.forward * fraction, self.decode * max(fraction, 0.5), self.compute)


def measure_speed(model, *, seq_len: int = 128, batch: int = 4, compute=None) -> Speed:
    """Time a no-grad forward of batch x seq_len random tokens and of one token (after a warm-up)."""
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", None) or 1000)
    ids = torch.randint(0, vocab, (batch, seq_len), device=device)
    context = compute.autocast() if compute is not None else contextlib.nullcontext()
    with torch.no_grad(), context:
        model(input_ids=ids[:1, :8], use_cache=False)  # warm-up: kernels, allocations
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        forward = (time.perf_counter() - start) / ids.numel()
        start = time.perf_counter()
        for _ in range(3):
            model(input_ids=ids[:1, :1], use_cache=False)
        decode = (time.perf_counter() - start) / 3
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return Speed(forward, decode, compute.dtype if compute is not None else names.get(model.dtype, str(model.dtype)))


@contextlib.contextmanager
def announced(what: str, seconds: float | None, log):
    """Say the estimate of a block of work before it runs and how long it took after."""
    log(f"{what}: estimated {format_seconds(seconds)} on this machine")
    start = time.perf_counter()
    yield
    log(f"{what}: took {format_seconds(time.perf_counter() - start)} (estimated {format_seconds(seconds)})")
