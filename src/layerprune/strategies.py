"""How the layers to drop are chosen, as plain loops over ORIGINAL layer indices.

- one-shot by a metric: score once, drop what ranks lowest under the budget;
- select auto: every metric's drop-set is a candidate; the one with the lowest loss on held-out
  calibration text (before any healing) wins;
- select search, and any select under a quality target (max_loss_increase / max_ppl_ratio): drop-sets
  judged by that loss directly (search.py);
- iterative `step:total` ("1:4:8" in arXiv 2411.15558): score, drop `step` layers, heal, repeat.

Nothing here reads or writes files: `score` is a callback, so a run can cache scores on disk and the
Python API can compute them in memory through the same code.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from layerprune.config import PruneConfig
from layerprune.errors import LayerpruneError
from layerprune.importance import LayerScores, compute_many, get_metric
from layerprune.models.surgery import kept_layers, remove_layers, validate_drop
from layerprune.scoring import prune_metric_requests
from layerprune.selection import count_to_drop

ScoreFn = Callable[[dict[str, dict]], dict[str, LayerScores]]  # {metric: params} -> scores of the current model
Log = Callable[[str], None]



def in_memory_scores(model: nn.Module, calibration) -> ScoreFn:
    """A ScoreFn computing every request on `calibration` (None: only data-free metrics can be asked)."""
    return lambda requests: compute_many(model, requests, calibration)


def needs_calibration(config: PruneConfig) -> bool:
    """Whether choosing layers with this config reads calibration text."""
    if config.drop is not None:
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
    from layerprune.budgets import Budget, measure_layer_costs, select_with_budget

    if n_drop is None:
        n_drop = layers_to_drop(model, config)
    if config.select == "search" or config.quality_target() is not None:
        from layerprune.search import choose_by_loss

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
    losses = candidate_losses(model, {name: c["dropped"] for name, c in candidates.items()}, validation)
    best = min(losses, key=lambda name: (losses[name], name))
    log("validation loss of each candidate: " + ", ".join(f"{n} {v:.3f}" for n, v in losses.items()))
    return {**candidates[best], "chosen_by": f"auto:{best}",
            "candidates": {n: {"dropped": c["dropped"], "validation_loss": losses[n]} for n, c in candidates.items()}}


def candidate_losses(model: nn.Module, drop_sets: dict[str, list[int]], validation) -> dict[str, float]:
    """Mean next-token loss on `validation` of the model without each drop-set (ORIGINAL indices)."""
    from layerprune.importance.perplexity import drop_set_losses

    if validation is None:
        raise LayerpruneError("select auto needs held-out calibration text to compare candidates")
    data = validation() if callable(validation) else validation
    kept = kept_layers(model)
    losses, _ = drop_set_losses(model, data, {n: [kept.index(i) for i in d] for n, d in drop_sets.items()})
    return losses


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
    from layerprune.models.sublayer import check_sublayers, removable_layers
    from layerprune.models.surgery import provenance

    kind, metric = config.granularity, config.metrics[0]
    record = provenance(model)
    candidates = removable_layers(record, kind)
    k = count_to_drop(len(candidates), num_layers=config.num_layers, ratio=config.ratio)
    kept = record["kept_layers"]
    protected = set(kept[:config.protect_first]) | set(kept[len(kept) - config.protect_last:]
                                                       if config.protect_last else [])
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
    """What a pruned model's provenance history keeps of its selection record."""
    return {"chosen_by": record["chosen_by"], **record.get("constraints", {})}


def iterative_rounds(config: PruneConfig) -> list[int]:
    """Layers removed in each round of an iterative schedule: '1:4:8' -> [4, 4]."""
    step, total = config.parsed_schedule()
    return [step] * (total // step)


def prune_round(model: nn.Module, config: PruneConfig, step: int, round_number: int, *, score: ScoreFn,
                validation=None, log: Log = print) -> dict:
    """One round of an iterative schedule on `model` (in place): choose `step` layers and remove them."""
    record = choose(model, config, score=score, validation=validation, n_drop=step, log=log)
    remove_layers(model, record["dropped"], how={**history_entry(record), "round": round_number})
    log(f"round {round_number}: dropped original layers {record['dropped']} ({record['chosen_by']})")
    return {**record, "round": round_number}


def iterative_prune(
    model: nn.Module,
    config: PruneConfig,
    *,
    calibration=None,
    validation=None,
    heal: Callable[[nn.Module, int], nn.Module] | None = None,
    log: Log = print,
) -> tuple[nn.Module, list[dict]]:
    """Score -> drop `step` layers -> heal, until the schedule's total is gone; re-scores every round.

    `heal(model, round_number)` returns the healed model (None: no healing between rounds).
    Returns the final model and each round's selection record.
    """
    rounds = []
    for number, step in enumerate(iterative_rounds(config), 1):
        rounds.append(prune_round(model, config, step, number, score=in_memory_scores(model, calibration),
                                  validation=validation, log=log))
        if heal is not None:
            model = heal(model, number)
    return model, rounds
