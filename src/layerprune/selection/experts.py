"""Choosing the experts to remove: in every MoE layer the same number, the lowest-scored (higher = keep).

Every supported config holds one expert count for all MoE layers, so a budget is a count per layer (a ratio
of the current experts, rounded to nearest). Group-limited routing (DeepSeek) takes as many from every group
of consecutive experts. Pure over ExpertScores; `choose_experts` scores the model first, `prune_experts`
chooses and removes (the one expert step of the API, the CLI and runs).
"""

from __future__ import annotations

from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.importance.experts.registry import ExpertScores, compute_expert_scores, get_expert_metric
from layerprune.models.experts.anatomy import expert_count, expert_groups
from layerprune.models.experts.surgery import remove_experts
from layerprune.selection.ranking import count_or_share


def experts_to_drop(n_experts: int, top_k: int, *, num_experts: int | None = None, ratio: float | None = None,
                    groups: int = 1) -> int:
    """How many experts each MoE layer loses: `num_experts`, or `ratio` of the current ones (rounded)."""
    num_experts = count_or_share(n_experts, num_experts, ratio, what="experts to remove", ratio_name="an expert ratio")
    if n_experts - num_experts < top_k:
        raise LayerpruneError(f"cannot remove {num_experts} of {n_experts} experts per layer: the router chooses "
                              f"num_experts_per_tok={top_k}, so at least {top_k} must stay")
    if num_experts % groups:
        raise LayerpruneError(f"this model routes within {groups} groups of experts, and {num_experts} experts per "
                              f"layer cannot be taken evenly from them; remove a multiple of {groups}")
    return num_experts


def lowest_experts(scores: ExpertScores, n_drop: int, groups: int = 1) -> dict[int, list[int]]:
    """{ORIGINAL layer: the ORIGINAL experts scored lowest}, n_drop per layer, n_drop / groups per group
    (ties: the later expert goes first)."""
    drop = {}
    for layer, experts, values in zip(scores.layers, scores.experts, scores.values):
        size = len(experts) // groups
        chosen = []
        for g in range(groups):
            members = range(g * size, (g + 1) * size)
            ranked = sorted(members, key=lambda p: (values[p], -p))
            chosen += [experts[p] for p in ranked[: n_drop // groups]]
        drop[layer] = sorted(chosen)
    return drop


def choose_experts(model: nn.Module, calibration, *, metric: str, num_experts: int | None = None,
                   ratio: float | None = None, params: dict | None = None, routing=None
                   ) -> tuple[dict[int, list[int]], dict]:
    """(the experts to remove {ORIGINAL layer: [ORIGINAL experts]}, how they were chosen). routing: the
    calibration pass (importance/experts/streaming.py for a model left on disk; default: the loaded model's)."""
    get_expert_metric(metric)
    top_k = model.config.get_text_config().num_experts_per_tok
    groups = expert_groups(model)
    n_drop = experts_to_drop(expert_count(model), top_k, num_experts=num_experts, ratio=ratio, groups=groups)
    scores = compute_expert_scores(model, {metric: dict(params or {})}, calibration,
                                   **({"routing": routing} if routing is not None else {}))[metric]
    drop = lowest_experts(scores, n_drop, groups)
    how = {"chosen_by": metric, "experts_per_layer": n_drop, "scores": scores.to_json()}
    return drop, how


def prune_experts(model: nn.Module, config, calibration, log=print) -> dict:
    """Choose and remove the experts of every MoE layer (a PruneConfig's expert_ratio / num_experts /
    drop_experts), in place; the record the provenance and selection.json keep."""
    if config.drop_experts is not None:
        drop = config.drop_experts
        per_layer = {len(experts) for experts in drop.values()}
        remove_experts(model, drop, how={"chosen_by": "explicit"})
        return {"dropped": {str(layer): sorted(experts) for layer, experts in drop.items()}, "chosen_by": "explicit",
                "experts_per_layer": max(per_layer)}
    drop, how = choose_experts(model, calibration, metric=config.expert_metric, num_experts=config.num_experts,
                               ratio=config.expert_ratio, params=expert_metric_params(config))
    remove_experts(model, drop, how={"chosen_by": config.expert_metric})
    log(f"removed {how['experts_per_layer']} experts from each of {len(drop)} MoE layers (chosen by "
        f"{config.expert_metric})")
    return {"dropped": {str(layer): experts for layer, experts in drop.items()}, **how}


def expert_metric_params(config) -> dict:
    """The expert metric's parameters a PruneConfig implies: random draws with the calibration seed."""
    return {"seed": config.calibration.seed} if config.expert_metric == "random" else {}
