"""How the layers to drop are chosen, as plain loops over ORIGINAL layer indices.

- one-shot by a metric: score once, drop what ranks lowest under the budget;
- select auto: every metric's drop-set is a candidate; the one with the lowest loss on held-out
  calibration text (before any healing) wins (or the lowest KL / task-answer loss: select_objective);
- select search, and any select under a quality target (max_loss_increase / max_ppl_ratio): drop-sets
  judged by that loss directly (search.py);
- iterative `step:total` ("1:4:8" in arXiv 2411.15558): score, drop `step` layers, heal, repeat.

`prune` is the one loop behind every door (api.prune_model, the CLI, pipeline.Run): its steps are
callbacks (PruneHooks), so a run caches scores, selections and models in its folder and resumes, while the
Python API computes them in memory. Nothing here reads or writes files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.importance import LayerScores, compute_many, get_metric
from layerprune.models.provenance_labels import get_objective, objective_label
from layerprune.models.sublayer import check_sublayers, removable_layers, remove_units
from layerprune.models.surgery import kept_layers, provenance, validate_drop
from layerprune.selection.budgets import Budget, measure_layer_costs, select_with_budget
from layerprune.selection.config import PruneConfig
from layerprune.selection.drop_set_losses import DropSetLosses
from layerprune.selection.objectives import objective_record
from layerprune.selection.ranking import count_to_drop, protected_layers
from layerprune.selection.scores import prune_metric_requests
from layerprune.selection.search import choose_by_loss

ScoreFn = Callable[[dict[str, dict]], dict[str, LayerScores]]  # {metric: params} -> scores of the current model
Log = Callable[[str], None]


def in_memory_scores(model: nn.Module, calibration) -> ScoreFn:
    """A ScoreFn computing every request on `calibration` (None: only data-free metrics can be asked)."""
    return lambda requests: compute_many(model, requests, calibration)


def needs_calibration(config: PruneConfig) -> bool:
    """Whether choosing layers with this config reads calibration text (experts are scored apart)."""
    if config.drop is not None or not config.prunes_layers:
        return False
    if config.select != "metric" or config.quality_target() is not None:
        return True  # candidates are judged on held-out calibration text
    return any(get_metric(name).needs_calibration for name in config.metrics)


def layers_to_drop(model: nn.Module, config: PruneConfig) -> int | None:
    """How many layers a one-shot prune removes; None when a parameter, latency or quality target decides."""
    if config.drop is not None:
        return len(config.drop)
    if config.budget() is None or config.budget().is_target:
        return None
    return count_to_drop(len(kept_layers(model)), num_layers=config.num_layers, ratio=config.ratio)


def choose(
    model: nn.Module,
    config: PruneConfig,
    *,
    score: ScoreFn,
    validation=None,
    n_drop: int | None = None,
    log: Log = print,
) -> dict:
    """The selection record of one prune: {"dropped": ORIGINAL indices, "chosen_by", ...}.

    n_drop overrides the config's count (an iterative round drops `step` layers). `validation` is the
    held-out calibration data that select auto, select search and quality targets judge candidates on (a CalibrationData, or a
    zero-argument callable returning one, so it is only read when needed).
    """
    if config.drop is not None:
        dropped = validate_drop(model, config.drop) if config.granularity == "block" else sorted(config.drop)
        return {"dropped": dropped, "chosen_by": "explicit", "granularity": config.granularity}
    if config.granularity != "block":
        return _choose_branches(model, config, score)

    if n_drop is None:
        n_drop = layers_to_drop(model, config)
    if config.select == "search" or config.quality_target() is not None:
        return choose_by_loss(model, config, score=score, validation=validation, n_drop=n_drop, log=log)
    scores = score(prune_metric_requests(config, len(kept_layers(model)), n_drop))
    target = config.budget() if n_drop is None else None  # a parameter or latency target
    costs = None
    if target is not None and target.target_latency is not None:
        costs = measure_layer_costs(model, mode=target.latency_mode)
    candidates = {}
    for name, metric_scores in scores.items():
        block = metric_scores.params.get("block_size")
        budget = target or Budget(num_layers=int(block) if block and n_drop is None else n_drop)
        selection = select_with_budget(model, metric_scores, budget, protect_first=config.protect_first,
                                       protect_last=config.protect_last, latency_costs=costs)
        candidates[name] = _record(selection.dropped, name, metric_scores, selection.constraints)
    if config.select == "metric":
        return candidates[config.metrics[0]]
    losses, judged = candidate_losses(model, {name: c["dropped"] for name, c in candidates.items()}, validation,
                                      config.select_objective)
    best = min(losses, key=lambda name: (losses[name], name))
    log(f"{objective_label(config.select_objective)} of each candidate: "
        + ", ".join(f"{n} {v:.3f}" for n, v in losses.items()))
    # "validation_loss" holds the objective's value whatever the objective: the name older readers know
    return {**candidates[best], "chosen_by": f"auto:{best}",
            "candidates": {n: {"dropped": c["dropped"], "validation_loss": losses[n]} for n, c in candidates.items()},
            "validation": objective_record(config.select_objective, losses[best], judged.intact_loss,
                                           judged.description)}


@dataclass(frozen=True)
class Judged:
    """What the candidates were judged on: the unpruned model's value and the validation data's description."""

    intact_loss: float
    description: dict


def candidate_losses(model: nn.Module, drop_sets: dict[str, list[int]], validation, objective: str = "loss"
                     ) -> tuple[dict[str, float], Judged]:
    """The objective's value (default: mean next-token loss) on `validation` of the model without each
    drop-set (ORIGINAL indices)."""
    if validation is None:
        raise LayerpruneError("select auto needs held-out calibration text to compare candidates")
    data = validation() if callable(validation) else validation
    kept = kept_layers(model)
    engine = DropSetLosses(model, data, batch_size=4, cache_bytes=0, measure=get_objective(objective).measure)
    losses = {name: engine.loss([kept.index(i) for i in drop]) for name, drop in drop_sets.items()}
    return losses, Judged(engine.intact_loss, data.description)


def _record(dropped: list[int], metric: str, scores: LayerScores, constraints: dict) -> dict:
    record = {"dropped": dropped, "chosen_by": metric, "granularity": "block", "metric_params": scores.params,
              "constraints": constraints}
    if scores.calibration:
        record["calibration"] = scores.calibration
    return record


def _choose_branches(model: nn.Module, config: PruneConfig, score: ScoreFn) -> dict:
    """The layers whose attention (granularity "attention") or MLP ("mlp") alone goes.

    Candidates are the layers that still have both branches; num_layers/ratio count branches of those.
    protect_first/protect_last count the first/last layers of the current model, as for whole layers.
    """
    kind, metric = config.granularity, config.metrics[0]
    record = provenance(model)
    candidates = removable_layers(record, kind)
    k = count_to_drop(len(candidates), num_layers=config.num_layers, ratio=config.ratio)
    kept = record["kept_layers"]
    protected = protected_layers(kept, config.protect_first, config.protect_last)
    scores = score({metric: dict(config.metric_params.get(metric, {}))})[metric]
    pairs = [(layer, v) for layer, v in zip(scores.layers, scores.values)
             if layer in candidates and layer not in protected]
    if k > len(pairs):
        raise LayerpruneError(f"cannot remove {k} {kind} branches: only {len(pairs)} layers are candidates")
    eligible = LayerScores(scores.metric, [p[0] for p in pairs], [p[1] for p in pairs], scores.params)
    dropped = sorted(eligible.ranking()[:k])
    check_sublayers(record, kind, dropped)
    chosen = {"dropped": dropped, "chosen_by": metric, "granularity": kind, "metric_params": scores.params,
              "constraints": {"num_layers": k, "protect_first": config.protect_first,
                              "protect_last": config.protect_last}}
    if scores.calibration:
        chosen["calibration"] = scores.calibration
    return chosen


def history_entry(record: dict) -> dict:
    """What a pruned model's provenance history keeps of its selection record (and its round)."""
    entry = {"chosen_by": record["chosen_by"], **record.get("constraints", {})}
    return {**entry, "round": record["round"]} if "round" in record else entry


def iterative_rounds(config: PruneConfig) -> list[int]:
    """Layers removed in each round of an iterative schedule: '1:4:8' -> [4, 4]."""
    step, total = config.parsed_schedule()
    return [step] * (total // step)


@dataclass
class PruneHooks:
    """How the one prune loop meets its caller: the API computes every step in memory, a run
    (pipeline.Run) caches every step in its folder and resumes from it."""

    # (round, current model, layers to drop or None for the config's count) -> the selection record
    select: Callable[[int, nn.Module, int | None], dict]
    # the record of a round finished earlier (its model lives on disk), or None
    finished: Callable[[int], dict | None] = lambda number: None
    # the model as round `number` left it (after finished rounds); only called after a finished round
    reload: Callable[[int], nn.Module] | None = None
    # after each removal (a run saves the pruned model here)
    saved: Callable[[int, nn.Module, dict], None] = lambda number, model, record: None
    # healing between the rounds of an iterative schedule: (model, round) -> healed model
    heal: Callable[[nn.Module, int], nn.Module] | None = None


def prune(model: nn.Module, config: PruneConfig, hooks: PruneHooks, *, log: Log = print
          ) -> tuple[nn.Module | None, list[dict]]:
    """The one prune loop of the API, the CLI and runs. One-shot is one round that removes the config's
    count; an iterative schedule `step:total` ("1:4:8" in arXiv 2411.15558) is total/step rounds of
    choose -> remove -> heal, re-scoring the healed model every round. Removal happens in place.

    Returns the final model (None when every round had finished earlier) and each round's record."""
    steps = iterative_rounds(config) if config.strategy == "iterative" else [None]
    records = []
    for number, step in enumerate(steps, 1):
        record = hooks.finished(number)
        if record is not None:
            model = None
            records.append(record)
            continue
        if model is None:
            model = hooks.reload(number - 1)
        record = hooks.select(number, model, step)
        if step is not None:
            record = {**record, "round": number}
        remove_units(model, record["dropped"], config.granularity, how=history_entry(record))
        hooks.saved(number, model, record)
        if step is not None:
            log(f"round {number}/{len(steps)}: dropped original layers {record['dropped']} ({record['chosen_by']})")
            if hooks.heal is not None:
                model = hooks.heal(model, number)
        records.append(record)
    return model, records
