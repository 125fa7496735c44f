"""How long healing will take on this machine, measured before it starts, and a time budget it keeps.

Before the Trainer starts, a forward + backward of a real micro-batch is timed (twice: the first warms up) (the loss as the trainer
computes it, under the chosen autocast; the gradients are thrown away), and, when the teacher's top-k
targets must be computed, one teacher batch. That gives an honest estimate of the whole stage on this
machine, printed before any long work; with `max_minutes`, it also fits the number of steps into the
budget so the learning-rate schedule runs its full course (warm-up, decay) in the steps that fit. During
training a callback re-fits the steps and the schedule to the real pace, and stops at the deadline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from layerprune.data.collate import PadCollator
from layerprune.errors import LayerpruneError
from layerprune.finetune.config import HealConfig
from layerprune.finetune.losses import chunked_cross_entropy, chunked_distillation
from layerprune.finetune.teacher import compute_teacher_targets
from layerprune.hardware.compute import ComputeChoice
from layerprune.models.logits import causal_lm_parts, labelled_positions
from layerprune.models.prune_result import PruneResult  # noqa: F401  (public: layerprune.api.PruneResult)

OPTIMIZER_SHARE = 0.05  # AdamW's update on top of forward + backward (measured ~3% for full weights on SmolLM2)
# No margin for the Trainer's own work per step or the hidden-state loss (real steps ran 0-35% slower than
# the probe on SmolLM2): the plan is an upper bound that budget_callback shortens to the real pace.


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
        start = time.perf_counter()
        compute_teacher_targets(teacher, rows[:batch_size], top_k, pad_id=pad_id, batch_size=batch_size,
                                compute=compute)
        teacher_row = (time.perf_counter() - start) / len(rows[:batch_size])
    return HealProbe(step_seconds=micro * accumulation * (1 + OPTIMIZER_SHARE),
                     teacher_row_seconds=teacher_row)


def _forward_backward(model, ids, mask, labels, compute: ComputeChoice, distill=None) -> float:
    """Seconds of one forward + backward with the trainer's loss (gradients left for the caller to drop)."""
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


def budget_callback(deadline: float, clock=time.perf_counter):
    """A TrainerCallback that keeps training inside a budget ending at `deadline` (a `clock()` time).

    The probe times a step in isolation; real steps run slower or faster (the Trainer's own work, a process
    that just ran evaluations, the first steps after the teacher pass: 0-35% slower on SmolLM2). So from the
    third step on, after every step the number of steps is re-fitted to the time left at the real pace (the
    mean since the end of the first step, which warms up), between the steps already run and the planned
    ones (the teacher's targets exist for the planned rows only), and the learning-rate schedule with it: it
    ends its decay at the last step that fits instead of being cut mid-way or ending early. The plan is
    therefore made from the probe without a margin. At the deadline it stops at the next step boundary
    whatever the pace."""
    from transformers import TrainerCallback

    class KeepToBudget(TrainerCallback):
        def __init__(self):
            self.stopped_early = False
            self.refitted_to: int | None = None  # the step count at the real pace, where it differs from the plan
            self.progress = None  # the Trainer's ProgressCallback, when heal() hands it over
            self._first: tuple[float, int] | None = None  # (time, step) at the end of the first step seen
            self._planned: int | None = None

        def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
            now = clock()
            if now > deadline and state.global_step < state.max_steps:
                control.should_training_stop = True
                self.stopped_early = True
                return control
            if self._first is None:  # the first step (of this run, or since a resume) warms up: not timed
                self._first, self._planned = (now, state.global_step), state.max_steps
                return control
            first_end, first_step = self._first
            if state.global_step - first_step >= 2:
                pace = (now - first_end) / (state.global_step - first_step)
                fits = state.global_step + math.floor((deadline - now) / pace)
                steps = min(max(fits, state.global_step), self._planned)
                if steps != state.max_steps:
                    _refit_schedule(lr_scheduler, args, steps)
                    state.max_steps = steps
                    bar = getattr(self.progress, "training_bar", None)
                    if bar is not None:  # the Trainer's progress bar shows the steps that fit
                        bar.total = steps
                        bar.refresh()
                    self.refitted_to = None if steps == self._planned else steps
            return control

    return KeepToBudget()


def _refit_schedule(lr_scheduler, args, total_steps: int) -> None:
    """Make a LambdaLR schedule (linear, cosine, ... with warm-up) end at total_steps, from its current step
    on; other schedulers are left alone (the stop at max_steps still holds)."""
    from transformers import get_scheduler

    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    if scheduler is None or not hasattr(scheduler, "lr_lambdas"):
        return
    optimizer = scheduler.optimizer
    fresh = get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=args.get_warmup_steps(total_steps),
                          num_training_steps=total_steps, scheduler_specific_kwargs=args.lr_scheduler_kwargs or {})
    scheduler.lr_lambdas = fresh.lr_lambdas
    # building it set the lr to its step-0 value; the next optimizer step takes the new schedule's lr of this step
    for group, base, rule in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * rule(scheduler.last_epoch)


def less_budget(config: HealConfig, seconds: float) -> HealConfig:
    """The healing config with `seconds` already spent out of its max_minutes (the teacher answering the
    prompts is part of the healing stage's budget)."""
    if config.max_minutes is None or seconds <= 0:
        return config
    left = config.max_minutes - seconds / 60
    if left <= 0:
        raise LayerpruneError(f"the teacher's responses took {seconds / 60:.1f} min, the whole max_minutes budget "
                              f"of {config.max_minutes:g}; raise max_minutes or lower response_tokens")
    return config.model_copy(update={"max_minutes": left})


@dataclass
class StepPlan:
    """How many steps a heal runs and why: the steps wanted, the steps planned (fitted to max_minutes), the
    deadline callback that keeps them to it, and the timed probe the estimate comes from."""

    wanted: int
    steps: int
    probe: HealProbe
    teacher_rows: int  # rows the teacher's top-k pass reads before training (0: no pass)
    deadline: object = None  # budget_callback(...) when max_minutes is set

    @property
    def estimate_s(self) -> float:
        return self.probe.seconds(self.steps, self.teacher_rows)


def plan_steps(model, rows, config, *, compute, pad_id: int, started: float, accumulation: int, rows_per_step: int,
               teacher=None, distill=None) -> StepPlan:
    """The one place a heal's steps are decided: time one step (and the teacher's pass), then with max_minutes
    fit the steps into what is left of the budget since `started` and make the deadline that keeps them to it."""
    probe = probe_heal(model, rows, batch_size=config.batch_size, accumulation=accumulation, compute=compute,
                       pad_id=pad_id, teacher=teacher, top_k=config.distill_top_k, distill=distill)
    wanted = config.max_steps if config.max_steps > 0 else math.ceil(config.epochs * len(rows) / rows_per_step)
    steps, deadline = wanted, None
    if config.max_minutes is not None:
        budget = config.max_minutes * 60 - (time.perf_counter() - started)
        steps = fit_steps(probe, budget, wanted, rows_per_step if teacher is not None else 0)
        deadline = budget_callback(started + config.max_minutes * 60)
    teacher_rows = min(len(rows), steps * rows_per_step) if teacher is not None else 0
    return StepPlan(wanted, steps, probe, teacher_rows, deadline)
