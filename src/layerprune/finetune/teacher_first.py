"""The teacher's top-k targets before the student is loaded: distillation's teacher pass with the teacher
alone in memory, on the device healing computes on (a GPU where there is one) and in its checkpoint's 16-bit
dtype where that device computes it natively (finetune/placement.py), read layer by layer from disk when even
it does not fit; freed before the student loads.

It applies when the rows training will read are known before the student is timed: a fixed number of
steps. Under a time budget (`max_minutes`) the steps follow from a timed student step, so where teacher
and student fit in memory together the student is loaded first and the teacher computes only the rows the
fitted steps use (the teacher pass is part of the budget); where they do not fit, the teacher goes first
and covers the steps wanted, and the budget then fits the steps to the time that is left.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from layerprune.data.mixes import is_mix, parse_mix
from layerprune.data.sources import BUNDLED_CORPORA
from layerprune.files.cache import cache_dir
from layerprune.finetune.config import HealConfig
from layerprune.finetune.methods import get_method
from layerprune.finetune.placement import folder_dtype, held_dtype
from layerprune.finetune.teacher import teacher_targets
from layerprune.hardware.compute import compute_choice
from layerprune.hardware.devices import available_memory_bytes, device_memory_bytes, release_memory, training_device
from layerprune.models.memory_policy import MEMORY_FRACTION, checkpoint_bytes


def rows_per_step(config: HealConfig) -> int:
    """Rows one optimizer step reads: micro-batch x accumulation x data-parallel processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wanted = config.effective_batch_size or config.batch_size
    accumulation = max(1, math.ceil(wanted / (config.batch_size * world)))
    return config.batch_size * accumulation * world


def distills_from_cache(config: HealConfig) -> bool:
    """Whether training reads the teacher only through its cached top-k targets (no live teacher)."""
    return get_method(config.method).distills and config.distill_top_k is not None and config.init != "replace"


def rows_to_cover(rows: list[dict], config: HealConfig) -> list[dict]:
    """The rows whose targets the steps read: the first max_steps x rows-per-step, or all (epochs)."""
    if config.max_steps > 0:
        return rows[:config.max_steps * rows_per_step(config)]
    return rows


def examples_needed(config: HealConfig, weight_share: float = 1.0) -> int | None:
    """How many examples of an instruction source the steps read (a mix's source: its share of the rows),
    or None when training reads them all (epochs)."""
    if config.max_steps <= 0:
        return None
    rows = config.max_steps * rows_per_step(config)
    if config.max_samples is not None:
        rows = min(rows, config.max_samples)
    return math.ceil(rows * weight_share) + 1  # + 1: the interleaving may take one more of a part


def examples_answered(config: HealConfig) -> int | None:
    """How many prompts `responses: teacher` (finetune/teacher_responses.py) has the teacher answer under
    this config (0 with the data's responses; None for epochs over all the data)."""
    if config.responses != "teacher":
        return 0
    source = config.data or get_method(config.method).default_data
    parts = parse_mix(source) if is_mix(source) else [(source, 1.0)]
    total = sum(weight for _, weight in parts)
    needed = [examples_needed(config, weight / total) for name, weight in parts
              if name not in BUNDLED_CORPORA and not name.endswith((".txt", ".txt.gz"))]
    return None if None in needed else sum(needed)


def teacher_placement(config: HealConfig, student: Path, teacher: Path) -> tuple[bool, bool]:
    """(whether the teacher pass runs before the student loads, whether the teacher is read layer by layer
    from disk because its weights alone do not fit the memory available); see the module's docstring. The
    memory is the training device's (a GPU's: the teacher is loaded there), the teacher's size the one it is
    held in (placement.held_dtype: its checkpoint's 16-bit dtype where the device computes that natively)."""
    device = training_device()
    available = (available_memory_bytes() if device == "cpu" else device_memory_bytes(device)) or 0
    stored = folder_dtype(str(teacher))
    scale = held_dtype(str(teacher), config, device).itemsize / stored.itemsize if stored is not None else 1.0
    sizes = checkpoint_bytes(student), round(checkpoint_bytes(teacher) * scale)
    both_fit = not available or sum(sizes) <= MEMORY_FRACTION * available
    first = distills_from_cache(config) and (config.max_minutes is None or not both_fit)
    return first, first and bool(available) and sizes[1] > MEMORY_FRACTION * available


def targets_before_student(rows: list[dict], config: HealConfig, load_teacher, *, pad_id: int, stream_from=None,
                           log=print, state_layers: list[int] = ()):
    """(TeacherTargets of rows_to_cover(rows), notes): the teacher loaded by `load_teacher()` (or, with
    `stream_from`, run from that checkpoint folder one layer at a time), its targets computed or read from
    the cache, and the teacher released before this returns. state_layers: teacher layers whose output
    states are kept too (distill_hidden)."""
    from tqdm.auto import tqdm

    covered = rows_to_cover(rows, config)
    start = time.perf_counter()
    teacher = stream_from if stream_from is not None else load_teacher()
    device = "cpu" if stream_from is not None else next(teacher.parameters()).device
    compute = compute_choice(device, config.bf16)
    log(f"teacher top-{config.distill_top_k} targets of {len(covered)} rows before the student loads"
        + (" (teacher read layer by layer from disk)" if stream_from is not None else ""))
    bar = tqdm(total=len(covered), desc=f"teacher top-{config.distill_top_k} targets", unit="row", leave=False)
    try:
        targets, cached = teacher_targets(teacher, covered, config.distill_top_k, pad_id=pad_id,
                                          cache_dir=cache_dir() / "teacher", batch_size=config.batch_size,
                                          compute=compute, log=lambda done, total: bar.update(done - bar.n),
                                          state_layers=state_layers)
    finally:
        bar.close()
        del teacher
        release_memory()  # on a GPU too: the student loads next
    notes = {"file": targets.key["file"], "k": config.distill_top_k, "from_cache": cached,
             "seconds": round(time.perf_counter() - start, 2), "before_student": True,
             "streamed": stream_from is not None}
    return targets, notes
