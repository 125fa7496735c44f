"""The time plan of a run, a prune or a curve: each stage with its estimate on this machine (hardware/
estimate.py), printed before the work starts; the real times are added as the stages end."""

from __future__ import annotations

from layerprune.data.task_answers import SELECT_TASKS
from layerprune.hardware.speed import Speed
from layerprune.models.anatomy import get_anatomy, parameter_bytes
from layerprune.planning.estimate import (
    Plan,
    bench_seconds,
    drop_set_seconds,
    eval_seconds,
    heal_seconds,
    score_seconds,
    search_evaluations,
    work_fraction,
)
from layerprune.selection.curve import max_drop_count
from layerprune.selection.strategies import iterative_rounds, layers_to_drop

SAVE_BYTES_PER_S = 200e6  # writing safetensors, a conservative disk
# select_objective tasks: tokens per task document as batched (SmolLM2's tokenizer: 37.6 real tokens a document,
# 55 with the padding of batches of rows sorted by length).
TASK_DOCUMENT_TOKENS = 55


def judged_tokens(config) -> int:
    """Tokens of the validation data that drop-sets are judged on (held-out calibration text, or task documents)."""
    if config.select_objective == "tasks":
        return len(SELECT_TASKS) * config.select_tasks_docs * TASK_DOCUMENT_TOKENS
    return config.calibration.n_samples * config.calibration.seq_len


def choose_seconds(model, config, speed: Speed, n_drop: int | None) -> float:
    """Scoring the metrics and choosing the drop-set of a PruneConfig (select metric | auto | search)."""
    if config.drop is not None:
        return 0.0
    n = get_anatomy(model).num_layers
    tokens = config.calibration.n_samples * config.calibration.seq_len
    k = n_drop if n_drop is not None else n // 2  # a target decides: the search may go as far as half
    seconds = 0.0 if config.select == "search" else score_seconds(config.metrics, n, tokens, speed)
    allowed = n - config.protect_first - config.protect_last
    judged = judged_tokens(config)
    if config.select == "search":
        seconds += drop_set_seconds(search_evaluations(allowed, k, config.search_beam, config.search_swap), judged,
                                    speed)
    elif config.select == "auto" or config.quality_target() is not None or n_drop is None:
        seconds += drop_set_seconds(len(config.metrics) * (1 if n_drop is not None else k), judged, speed)
    return seconds


def curve_seconds(model, config, speed: Speed) -> float:
    """Every selection's path of a CurveConfig, k = 1..K, on held-out text (+ the metrics' scores)."""
    n = get_anatomy(model).num_layers
    top = max_drop_count(config.max_drop, n, config.protect_first, config.protect_last)
    tokens = config.calibration.n_samples * config.calibration.seq_len
    allowed = n - config.protect_first - config.protect_last
    metrics = [name for name in config.selections if name != "search"]
    evaluations = top * len(metrics)
    if "search" in config.selections:
        evaluations += search_evaluations(allowed, top, config.search_beam)
    return score_seconds(metrics, n, tokens, speed) + drop_set_seconds(evaluations, judged_tokens(config), speed)


def save_seconds(model) -> float:
    return parameter_bytes(model) / SAVE_BYTES_PER_S


def plan_run(config, stages, run_dir, model, speed: Speed, heal_speed: Speed, done: set[str]) -> Plan:
    """The time plan of a run of `config` (its `stages`, runs/planner.py) on the loaded original `model`; stages
    in `done` are skipped."""
    c = config
    n = get_anatomy(model).num_layers
    n_drop = layers_to_drop(model, c.prune) if c.prune.strategy == "one-shot" else c.prune.parsed_schedule()[1]
    fraction = work_fraction(model, n - (n_drop if n_drop is not None else n // 4))
    pruned = speed.scaled(fraction)
    plan = Plan(f"plan of {run_dir} on this machine ({speed.compute}, healing in {heal_speed.compute})")
    for stage in stages:
        name = stage.name
        if name == "eval-original":  # instruction following compares the original with itself: no work
            what, seconds = "evaluate", eval_seconds(c.eval.model_copy(update={"follow": 0}), speed)
        elif name.startswith("eval-"):  # the original's responses are generated once, by the first of these
            compared_before = any(s.name.startswith("eval-") and s.name != "eval-original" for s in plan.stages)
            what, seconds = "evaluate", eval_seconds(c.eval, pruned, reference=speed, reference_cached=compared_before)
        elif name == "curve":
            what, seconds = "trade-off curve", curve_seconds(model, c.curve, speed)
        elif name == "prune":
            what = f"score + choose ({c.prune.select}) + save"
            seconds = choose_seconds(model, c.prune, speed, n_drop) + save_seconds(model) * fraction
        elif stage.step == "heal":
            config = c.heal[stage.number - 1]
            what, seconds = f"heal ({config.method})", heal_seconds(config, heal_speed, student_fraction=fraction)
        elif name == "rounds":
            what, seconds = f"iterative {c.prune.schedule}", _rounds_seconds(c, model, speed, heal_speed, fraction)
        elif name == "bench":
            what, seconds = "benchmark", bench_seconds(c.bench, speed) + bench_seconds(c.bench, pruned)
        else:
            what, seconds = stage.name, 2.0
        plan.add(name, what, seconds, skipped=name in done)
    return plan


def _rounds_seconds(c, model, speed: Speed, heal_speed: Speed, fraction: float) -> float | None:
    total = 0.0
    for step in iterative_rounds(c.prune):
        total += choose_seconds(model, c.prune, speed, step) + save_seconds(model)
        for config in c.heal:
            seconds = heal_seconds(config, heal_speed, student_fraction=fraction)
            if seconds is None:
                return None
            total += seconds
    return total
