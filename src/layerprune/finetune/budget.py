"""How long healing will take on this machine, measured before it starts, and a time budget it keeps.

Before the Trainer starts, a forward + backward of a real micro-batch is timed (twice: the first warms up) (the loss as the trainer
computes it, under the chosen autocast; the gradients are thrown away), and, when the teacher's top-k
targets must be computed, one teacher batch. That gives an honest estimate of the whole stage on this
machine, printed before any long work; with `max_minutes`, it also fits the number of steps into the
budget so the learning-rate schedule runs its full course (warm-up, decay) in the steps that fit. A
callback still stops at a step boundary if the steps run slower than measured.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from layerprune.hardware.compute import ComputeChoice

OPTIMIZER_SHARE = 0.05  # AdamW's update on top of forward + backward (measured ~3% for full weights on SmolLM2)
# The Trainer's own work per step (data loading, the cached targets and states read back, callbacks) and the
# hidden-state loss, which the probe leaves out: distillation steps ran 10%, 19% and 20% slower than the
# probe in three 11-minute budgets on SmolLM2 (AVX512-BF16: 3.52 s probe vs 3.86 s per step, 3.28 vs 3.9,
# 3.26 vs 3.91), and the deadline then cut the schedule before its decay ended. A budget that fits slightly
# fewer steps completes its schedule; one that fits too many is cut.
STEP_OVERHEAD = 0.20


@dataclass(frozen=True)
class HealProbe:
    """Seconds per optimizer step (all its micro-batches) and per teacher row, measured here."""

    step_seconds: float
    teacher_row_seconds: float

    def seconds(self, steps: int, teacher_rows: int) -> float:
        return steps * self.step_seconds + teacher_rows * self.teacher_row_seconds


def probe_heal(model, rows: list[dict], *, batch_size: int, accumulation: int, compute: ComputeChoice, pad_id: int,
               teacher=None, top_k: int | None = None, distill: tuple[float, float, int] | None = None) -> HealProbe:
    """Time one forward + backward of a micro-batch of `model` (gradients discarded) and, with a teacher,
    its top-k pass over one batch. distill: (alpha, temperature, k) when training distils toward top-k
    targets: the probe computes that loss (on stand-in targets); its log-softmax over the vocabulary and the
    recomputation of each checkpointed chunk cost about 40% more than cross-entropy alone on SmolLM2
    (a probe of CE only planned 3.0 s steps that took 4.2 s, and the budget cut the schedule short)."""
    from layerprune.finetune.collate import PadCollator

    batch = PadCollator(pad_id)(rows[:batch_size])
    device = next(model.parameters()).device
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[]):  # dropout draws here must not shift the training run's randomness
        micro = min(_forward_backward(model, ids, mask, labels, compute, distill) for _ in range(2))  # 1st warms up
    for p in model.parameters():
        p.grad = None
    model.train(was_training)
    teacher_row = 0.0
    if teacher is not None and top_k is not None:
        from layerprune.finetune.teacher import compute_teacher_targets

        start = time.perf_counter()
        compute_teacher_targets(teacher, rows[:batch_size], top_k, pad_id=pad_id, batch_size=batch_size,
                                compute=compute)
        teacher_row = (time.perf_counter() - start) / len(rows[:batch_size])
    return HealProbe(step_seconds=micro * accumulation * (1 + OPTIMIZER_SHARE + STEP_OVERHEAD),
                     teacher_row_seconds=teacher_row)


def _forward_backward(model, ids, mask, labels, compute: ComputeChoice, distill=None) -> float:
    """Seconds of one forward + backward with the trainer's loss (gradients left for the caller to drop)."""
    from layerprune.finetune.losses import (
        causal_lm_parts, chunked_cross_entropy, chunked_distillation, labelled_positions,
    )

    start = time.perf_counter()
    with compute.autocast():
        hidden, targets = labelled_positions(model, ids, mask, labels)
        _, head, softcap = causal_lm_parts(model)
        if distill is None:
            loss = chunked_cross_entropy(head, hidden, targets, softcap=softcap)
        else:  # the same computation as training toward cached top-k targets, on stand-in targets
            alpha, temperature, k = distill
            values = torch.zeros(len(targets), k, device=hidden.device)
            indices = torch.arange(k, device=hidden.device).expand(len(targets), k)
            loss = chunked_distillation(head, hidden, targets, lambda a, b: (values[a:b], indices[a:b]),
                                        temperature=temperature, alpha=alpha, softcap=softcap)
        loss = loss / max(len(targets), 1)
    loss.backward()
    return time.perf_counter() - start


def fit_steps(probe: HealProbe, budget_s: float, wanted_steps: int, rows_per_step: int) -> int:
    """The most steps (at least 1, at most wanted_steps) whose training and teacher pass fit in budget_s."""
    per_step = probe.step_seconds + rows_per_step * probe.teacher_row_seconds
    return max(1, min(wanted_steps, math.floor(budget_s / per_step))) if per_step > 0 else wanted_steps


def deadline_callback(deadline: float):
    """A TrainerCallback that stops training at the first step boundary after `deadline` (perf_counter)."""
    from transformers import TrainerCallback

    class StopAtDeadline(TrainerCallback):
        stopped_early = False

        def on_step_end(self, args, state, control, **kwargs):
            if time.perf_counter() > deadline and state.global_step < state.max_steps:
                control.should_training_stop = True
                StopAtDeadline.stopped_early = True
            return control

    return StopAtDeadline()

