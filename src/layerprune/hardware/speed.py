"""How fast this machine runs a model: a timed forward (tokens per second), and whether the machine is busy.

Estimates must survive a busy machine: a single forward timed while another job runs can be several times
slower than the work will be (two torch jobs on two cores slow each other 2-10x). So the shape that will run
is warmed up first, then timed a few times and the median kept, and the load average is read so that a
plan made on a loaded machine says so.
"""

from __future__ import annotations

import contextlib
import os
import statistics
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


FORWARD_REPEATS = 3  # timed forwards of the batch; the median is kept
DECODE_REPEATS = 5


def measure_speed(model, *, seq_len: int = 128, batch: int = 4, compute=None) -> Speed:
    """Seconds per token of a no-grad forward of batch x seq_len random tokens and of one token: each shape
    warmed up once (kernels, allocations), then timed several times; the median is kept (one slow timing,
    another process's burst, does not become the estimate)."""
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", None) or 1000)
    ids = torch.randint(0, vocab, (batch, seq_len), device=device)
    context = compute.autocast() if compute is not None else contextlib.nullcontext()
    with torch.no_grad(), context:
        forward = median_seconds(lambda: model(input_ids=ids, use_cache=False), FORWARD_REPEATS) / ids.numel()
        decode = median_seconds(lambda: model(input_ids=ids[:1, :1], use_cache=False), DECODE_REPEATS)
    names = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    return Speed(forward, decode, compute.dtype if compute is not None else names.get(model.dtype, str(model.dtype)))


def median_seconds(run, repeats: int, clock=time.perf_counter) -> float:
    """The median time of `repeats` calls of run(), after one untimed call of the same work."""
    run()
    times = []
    for _ in range(repeats):
        start = clock()
        run()
        times.append(clock() - start)
    return statistics.median(times)


def machine_load() -> tuple[float, int] | None:
    """(1-minute load average, CPU cores) where the OS tells; None elsewhere."""
    try:
        return os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return None


def busy_note(load: tuple[float, int] | None = None) -> str | None:
    """One line when other work keeps this machine's cores busy, so that estimates made now are read as such;
    None on an idle machine. Busy: a load average above 1.25 x the cores + 0.5 (one torch job alone keeps the
    load near the number of cores; a second one doubles it)."""
    load = load or machine_load()
    if load is None or load[0] <= 1.25 * load[1] + 0.5:
        return None
    return (f"the machine is busy (load {load[0]:.1f} on {load[1]} cores): times measured now run long, and so do "
            "estimates made from them")


@contextlib.contextmanager
def announced(what: str, seconds: float | None, log):
    """Say the estimate of a block of work before it runs and how long it took after."""
    log(f"{what}: estimated {format_seconds(seconds)} on this machine")
    start = time.perf_counter()
    yield
    log(f"{what}: took {format_seconds(time.perf_counter() - start)} (estimated {format_seconds(seconds)})")
