"""The healing time budget: steps re-fitted to the real pace, the learning-rate schedule with them."""

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments, get_scheduler

from layerprune.finetune.budget import HealProbe, budget_callback, fit_steps


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _run(tmp_path, *, seconds_per_step, deadline: float, planned: int, warmup: int = 2, resumed_at: int = 0):
    """Simulate the Trainer's loop: optimizer step, scheduler step, then the callbacks' on_step_end."""
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=1.0)
    args = TrainingArguments(output_dir=str(tmp_path), lr_scheduler_type="linear", warmup_steps=warmup,
                             max_steps=planned, report_to=[], use_cpu=True)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=warmup, num_training_steps=planned)
    clock = FakeClock()
    callback = budget_callback(deadline, clock=clock)
    state, control = TrainerState(max_steps=planned, global_step=resumed_at), TrainerControl()
    for _ in range(resumed_at):  # a checkpoint's schedule picks up where it stopped
        scheduler.step()
    lrs = []  # the lr each optimizer step used
    while state.global_step < state.max_steps and not control.should_training_stop:
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
        clock.now += seconds_per_step(state.global_step) if callable(seconds_per_step) else seconds_per_step
        state.global_step += 1
        callback.on_step_end(args, state, control, lr_scheduler=scheduler)
    return state, control, lrs, callback


def test_slower_steps_shorten_the_plan_and_the_schedule_still_decays_to_zero(tmp_path):
    # 100 steps planned, but at 2 s a step only 50 fit in the 100 s left
    state, control, lrs, callback = _run(tmp_path, seconds_per_step=2.0, deadline=100.0, planned=100)
    assert state.global_step == state.max_steps == 50 == callback.refitted_to
    assert not callback.stopped_early
    # warm-up (2 steps, planned with the old total) then the linear decay of a 50-step schedule from step 3 on
    assert lrs[:3] == pytest.approx([0.0, 0.5, 1.0 * (50 - 2) / (50 - 2)])
    for step in range(3, 50):
        assert lrs[step] == pytest.approx((50 - step) / (50 - 2)), step
    assert lrs[-1] > 0


def test_slow_first_steps_do_not_shorten_the_plan_for_good(tmp_path):
    # the first 5 steps take 4 s, the rest 1 s: a plan cut at step 3 (pace 4 s) grows back as the pace drops
    state, control, lrs, callback = _run(tmp_path, seconds_per_step=lambda step: 4.0 if step < 5 else 1.0,
                                         deadline=80.0, planned=100)
    assert not callback.stopped_early
    # 20 s for the first 5 steps, then 1 s steps: 65 in all would fit; the mean pace since step 1 lags a little
    assert 58 <= state.global_step == state.max_steps <= 65
    assert lrs[-1] == pytest.approx(1 / (state.global_step - 2))  # the decay ends at the last step run


def test_the_plan_never_grows_past_the_planned_steps(tmp_path):
    state, control, lrs, callback = _run(tmp_path, seconds_per_step=0.5, deadline=100.0, planned=40)
    assert state.global_step == 40 and callback.refitted_to is None
    assert lrs[-1] == pytest.approx(1 / 38)


def test_steps_at_the_planned_pace_keep_the_plan(tmp_path):
    state, control, lrs, callback = _run(tmp_path, seconds_per_step=1.0, deadline=100.5, planned=100)
    assert state.global_step == 100 and callback.refitted_to is None and not callback.stopped_early
    assert lrs[-1] == pytest.approx(1 / 98)


def test_a_resumed_run_is_paced_from_its_own_steps(tmp_path):
    # resumed at step 50 of 100 with 30 s left at 1 s a step: about 30 more steps, not the 50 planned
    state, control, lrs, callback = _run(tmp_path, seconds_per_step=1.0, deadline=30.5, planned=100, resumed_at=50)
    assert state.global_step == state.max_steps == callback.refitted_to == 80 and not callback.stopped_early
    assert lrs[-1] == pytest.approx(1 / 78)


def test_the_deadline_stops_training_at_a_step_boundary(tmp_path):
    # a plan the deadline cuts before any re-fit could see it: 1 s steps, 2.5 s budget
    state, control, _, callback = _run(tmp_path, seconds_per_step=1.0, deadline=2.5, planned=10)
    assert control.should_training_stop and callback.stopped_early and state.global_step == 3


def test_fit_steps_counts_the_teacher_pass():
    probe = HealProbe(step_seconds=2.0, teacher_row_seconds=0.25)
    assert fit_steps(probe, 60.0, 100, rows_per_step=4) == 20  # 3 s per step with its 4 teacher rows
    assert fit_steps(probe, 60.0, 10, rows_per_step=4) == 10
    assert fit_steps(probe, 1.0, 10, rows_per_step=4) == 1


def test_heal_refits_a_plan_that_ran_slower_than_its_probe(tmp_path, monkeypatch):
    """Through the real Trainer: a probe that promised fast steps, steps that take 1 s each (a fake clock)."""
    import itertools
    import time

    from tiny_models import tiny_model, tiny_tokenizer

    from layerprune import remove_layers
    from layerprune.data.instructions import Example, tokenize_examples
    from layerprune.finetune import HealConfig, budget, heal

    monkeypatch.setattr(budget, "probe_heal", lambda *a, **k: HealProbe(step_seconds=0.01, teacher_row_seconds=0.0))
    real_callback = budget.budget_callback

    def one_second_steps(deadline):
        start, ticks = time.perf_counter(), itertools.count(1)
        return real_callback(deadline, clock=lambda: start + next(ticks))

    monkeypatch.setattr(budget, "budget_callback", one_second_steps)
    rows = tokenize_examples([Example(f"say {w}", "", f"{w} {w}") for w in ["cat", "dog"] * 50], tiny_tokenizer(),
                             max_length=32)
    config = HealConfig(method="full", data="dolly", learning_rate=1e-3, max_steps=100, max_minutes=0.5,
                        batch_size=1, warmup_steps=2, bf16=False)
    result = heal(remove_layers(tiny_model("llama"), [2]), rows, config, tokenizer=tiny_tokenizer(),
                  work_dir=tmp_path / "work")
    plan = result.notes["time_budget"]
    assert plan["steps_planned"] == 100 and not plan["stopped_early"]
    assert 20 <= plan["refitted_to"] == result.steps <= 30  # ~30 one-second steps fit the 30 s budget
    lrs = [entry["learning_rate"] for entry in result.loss_curve]
    # the last step ran at the last non-zero lr of a linear decay over the re-fitted steps: the decay completed
    assert lrs[-1] == pytest.approx(1e-3 / (result.steps - 2))
    assert max(lrs) == pytest.approx(1e-3)
