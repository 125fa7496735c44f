"""Pruning budgets: how many layers to drop so that the pruned model meets a target size, speed or quality.

A budget is exactly one of: a number of layers, a ratio of the layers, a parameter count
(`target_params`, e.g. "100M") or a latency ratio (`target_latency`, e.g. 0.75 = the pruned model
takes at most 75% of the original's time). The two targets try the selection's own drop-set for
k = 1, 2, ... layers (a metric's ranking, or a search path) and stop at the first that fits: the
fewest layers that meet the target, protected layers never dropped.

A quality target (`QualityTarget`: max_loss_increase in nats, or max_ppl_ratio) bounds the count from
the other side: the most layers whose drop-set keeps the validation loss within it. It stands alone or
guards a size/speed target (search.py combines them).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.hardware.timing import model_device, synchronize, timed
from layerprune.importance.base import LayerScores
from layerprune.models.anatomy import count_parameters, get_anatomy
from layerprune.models.surgery import kept_layers
from layerprune.selection.ranking import Selection, count_to_drop, select_layers

BUDGET_KEYS = ("num_layers", "ratio", "target_params", "target_latency")
LATENCY_MODES = ("decode", "prefill")
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_param_count(value: int | float | str) -> int:
    """100M -> 100_000_000; also 1.5B, 350k, 2e9, 1,000,000 and plain integers."""
    if isinstance(value, bool):
        raise LayerpruneError(f"could not read a parameter count from {value!r}")
    if isinstance(value, (int, float)):
        count = round(value)
    else:
        text = str(value).strip().replace(",", "").replace("_", "")
        match = re.fullmatch(r"(\d+(?:\.\d*)?(?:e\d+)?)\s*([kmbgt]?)", text, flags=re.IGNORECASE)
        if not match:
            raise LayerpruneError(f"could not read a parameter count from {value!r}; write it like 100M, 1.5B or 350k")
        count = round(float(match[1]) * _SUFFIXES[match[2].lower()])
    if count < 1:
        raise LayerpruneError(f"the target parameter count must be positive, got {value!r}")
    return count


@dataclass(frozen=True)
class Budget:
    """What to prune to; exactly one of the four fields is set."""

    num_layers: int | None = None
    ratio: float | None = None
    target_params: int | str | None = None
    target_latency: float | None = None
    latency_mode: str = "decode"  # which latency target_latency measures

    def __post_init__(self) -> None:
        given = [key for key in BUDGET_KEYS if getattr(self, key) is not None]
        if len(given) != 1:
            raise LayerpruneError(f"give exactly one of {', '.join(BUDGET_KEYS)} (got {', '.join(given) or 'none'})")
        if self.target_params is not None:
            parse_param_count(self.target_params)
        if self.target_latency is not None and not 0 < self.target_latency < 1:
            raise LayerpruneError(f"target_latency is a ratio between 0 and 1 (exclusive), got {self.target_latency}")
        if self.latency_mode not in LATENCY_MODES:
            raise LayerpruneError(f"latency mode must be one of {', '.join(LATENCY_MODES)}, got {self.latency_mode!r}")

    @property
    def is_target(self) -> bool:
        """True for size/speed targets, which need the model to turn into a layer count."""
        return self.target_params is not None or self.target_latency is not None


@dataclass(frozen=True)
class QualityTarget:
    """The most validation loss a prune may cost: an increase in nats, or a perplexity ratio (= exp(increase)).

    It bounds the count from above (the MOST layers whose best drop-set found stays within it), where a
    size or speed target bounds it from below (the FEWEST layers that meet it)."""

    max_loss_increase: float | None = None
    max_ppl_ratio: float | None = None

    def __post_init__(self) -> None:
        if (self.max_loss_increase is None) == (self.max_ppl_ratio is None):
            raise LayerpruneError("give one of max_loss_increase or max_ppl_ratio")
        if self.max_loss_increase is not None and not self.max_loss_increase > 0:
            raise LayerpruneError(f"max_loss_increase must be positive, got {self.max_loss_increase}")
        if self.max_ppl_ratio is not None and not self.max_ppl_ratio > 1:
            raise LayerpruneError(f"max_ppl_ratio must be above 1, got {self.max_ppl_ratio}")

    @property
    def key(self) -> str:
        return "max_loss_increase" if self.max_loss_increase is not None else "max_ppl_ratio"

    @property
    def allowed_increase(self) -> float:
        """The target as nats of validation loss."""
        return self.max_loss_increase if self.max_loss_increase is not None else math.log(self.max_ppl_ratio)

    def describe(self) -> str:
        return f"{self.key} {getattr(self, self.key):g}"

    def as_target(self, increase: float) -> str:
        """An increase of the loss in the target's own unit: '0.412 nats' or 'perplexity x1.51'."""
        return f"{increase:.3f} nats" if self.key == "max_loss_increase" else f"perplexity x{math.exp(increase):.3f}"

    def needed(self, increase: float) -> str:
        """The setting that would allow this increase."""
        value = increase if self.key == "max_loss_increase" else math.exp(increase)
        return f"{self.key} >= {math.ceil(value * 1000) / 1000:g}"

    def record(self, increase: float) -> dict:
        return {self.key: getattr(self, self.key), "validation_loss_increase": increase,
                "validation_ppl_ratio": math.exp(increase)}


def most_within(loss_at: Callable[[int], float | None], limit: float, n_layers: int
                ) -> tuple[int, tuple[int, float] | None]:
    """(the largest k of 1, 2, ... before loss_at(k) first exceeds `limit` (0: already at k = 1), the first
    (k, loss) over it or None when every k allowed stays within). The walk stops at the first k over the
    limit: along a greedy path the loss rises almost monotonically, and each further k costs a search step."""
    for k in range(1, n_layers):
        loss = loss_at(k)
        if loss is None:  # protection allows no more layers
            return k - 1, None
        if loss > limit:
            return k - 1, (k, loss)
    return n_layers - 1, None


DropAt = Callable[[int], "list[int] | None"]  # k -> the k ORIGINAL indices a selection drops; None: no k-set


def fewest_along(drop_at: DropAt, value_after: Callable[[list[int]], float], target: float, n_layers: int
                 ) -> tuple[list[int] | None, tuple[list[int], float] | None]:
    """(the first of drop_at(1), drop_at(2), ... whose value_after(dropped) <= target, or None; the last
    drop-set tried and its value). Any selection method is a drop_at: a metric's ranking, a search path."""
    last = None
    for k in range(1, n_layers):
        dropped = drop_at(k)
        if dropped is None:  # protection (or a block table) allows no more layers
            break
        value = value_after(dropped)
        if value <= target:
            return dropped, (dropped, value)
        last = (dropped, value)
    return None, last


def metric_drop_at(scores: LayerScores, *, protect_first: int = 0, protect_last: int = 0) -> DropAt:
    """drop_at of a metric: its k lowest-scored layers (a block metric: its best block of k)."""

    def drop_at(k: int) -> list[int] | None:
        try:
            return select_layers(scores, num_layers=k, protect_first=protect_first, protect_last=protect_last).dropped
        except LayerpruneError:
            return None

    return drop_at


def _per_layer(model: nn.Module, scores: LayerScores | None, values: list) -> dict[int, float]:
    """Map per-position numbers of the current model onto ORIGINAL indices, checking the scores match it."""
    kept = kept_layers(model)
    if scores is not None and kept != list(scores.layers):
        raise LayerpruneError(f"the {scores.metric} scores are for layers {scores.layers}, but the model has {kept}")
    return dict(zip(kept, values))


def _most(n_layers: int, last: tuple[list[int], float] | None) -> str:
    if last is None:
        return "no layer may be dropped, which"
    return f"dropping the most layers allowed ({len(last[0])} of {n_layers})"


def params_along(model: nn.Module, drop_at: DropAt, target_params: int | str, *,
                 scores: LayerScores | None = None) -> tuple[list[int], dict]:
    """The first drop-set of drop_at(1), drop_at(2), ... that leaves at most target_params parameters (layer
    sizes from the model, no forward), and its constraints record."""
    target = parse_param_count(target_params)
    params = count_parameters(model)
    per_layer = _per_layer(model, scores, params["per_layer"])
    total = params["total"]
    if total <= target:
        raise LayerpruneError(f"target_params {target_params} ({target:,}) needs no pruning: the model has "
                              f"{total:,} parameters")

    def after(drop: list[int]) -> float:
        return total - sum(per_layer[i] for i in drop)

    dropped, last = fewest_along(drop_at, after, target, len(per_layer))
    if dropped is None:
        outside = total - sum(per_layer.values())
        raise LayerpruneError(f"target_params {target_params} ({target:,}) is unreachable: "
                              f"{_most(len(per_layer), last)} leaves {int(last[1] if last else total):,} parameters "
                              f"({outside:,} outside the layers)")
    return dropped, {"target_params": target, "params_before": total, "params_after": int(after(dropped))}


def select_for_params(
    model: nn.Module, scores: LayerScores, target_params: int | str, *, protect_first: int = 0, protect_last: int = 0
) -> Selection:
    """Fewest layers whose removal leaves at most target_params parameters (layer sizes from the model, no forward)."""
    drop_at = metric_drop_at(scores, protect_first=protect_first, protect_last=protect_last)
    dropped, constraints = params_along(model, drop_at, target_params, scores=scores)
    selection = select_layers(scores, num_layers=len(dropped), protect_first=protect_first, protect_last=protect_last)
    selection.constraints.update(constraints)
    return selection


def latency_along(model: nn.Module, drop_at: DropAt, target_latency: float, *, costs: dict | None = None,
                  mode: str = "decode", scores: LayerScores | None = None) -> tuple[list[int], dict]:
    """The first drop-set of drop_at(1), drop_at(2), ... whose estimated latency is at most target_latency x the
    original's, and its constraints record (see select_for_latency)."""
    costs = costs or measure_layer_costs(model, mode=mode)
    per_layer = _per_layer(model, scores, costs["layer_s"])
    total = costs["total_s"]

    def ratio(drop: list[int]) -> float:
        return (total - sum(per_layer[i] for i in drop)) / total

    dropped, last = fewest_along(drop_at, ratio, target_latency, len(per_layer))
    mode = costs.get("mode", mode)
    if dropped is None:
        raise LayerpruneError(f"target_latency {target_latency} is unreachable: {_most(len(per_layer), last)} leaves "
                              f"{last[1] if last else 1.0:.3f} of the measured {mode} latency "
                              f"({costs['overhead_s'] / total:.3f} is outside the layers)")
    return dropped, {"target_latency": target_latency, "estimated_latency_ratio": ratio(dropped), "latency": costs}


def select_for_latency(
    model: nn.Module,
    scores: LayerScores,
    target_latency: float,
    *,
    protect_first: int = 0,
    protect_last: int = 0,
    costs: dict | None = None,
    mode: str = "decode",
) -> Selection:
    """Fewest layers whose removal brings the estimated latency to at most target_latency x the original's.

    The estimate is the measured time minus the measured time of the dropped layers (see measure_layer_costs);
    pass `costs` to reuse a measurement.
    """
    drop_at = metric_drop_at(scores, protect_first=protect_first, protect_last=protect_last)
    dropped, constraints = latency_along(model, drop_at, target_latency, costs=costs, mode=mode, scores=scores)
    selection = select_layers(scores, num_layers=len(dropped), protect_first=protect_first, protect_last=protect_last)
    selection.constraints.update(constraints)
    return selection


def select_with_budget(
    model: nn.Module,
    scores: LayerScores,
    budget: Budget,
    *,
    protect_first: int = 0,
    protect_last: int = 0,
    latency_costs: dict | None = None,
) -> Selection:
    """The layers to drop under any budget; selection.constraints records the target and the measured numbers."""
    if budget.target_params is not None:
        return select_for_params(model, scores, budget.target_params, protect_first=protect_first,
                                 protect_last=protect_last)
    if budget.target_latency is not None:
        return select_for_latency(model, scores, budget.target_latency, protect_first=protect_first,
                                  protect_last=protect_last, costs=latency_costs, mode=budget.latency_mode)
    k = count_to_drop(len(scores.layers), num_layers=budget.num_layers, ratio=budget.ratio)
    return select_layers(scores, num_layers=k, protect_first=protect_first, protect_last=protect_last)


# ----------------------------------------------------------------------------- latency measurement


@torch.inference_mode()
def measure_layer_costs(
    model: nn.Module, *, mode: str = "decode", seq_len: int = 64, runs: int = 10, warmup: int = 2, seed: int = 0
) -> dict:
    """Median seconds of each decoder layer and of the whole forward, on random tokens.

    decode: one new token after a `seq_len`-token KV cache (each step adds its token to the cache: a few
    tokens on top of seq_len, and cropping is not stable across transformers versions); prefill: one forward
    of `seq_len` tokens without a cache. Layers are timed
    with hooks inside the same forward as the total, so overhead_s = total - sum(layers) is the rest
    of the model (embeddings, norm, lm_head, masks).
    """
    if mode not in LATENCY_MODES:
        raise LayerpruneError(f"latency mode must be one of {', '.join(LATENCY_MODES)}, got {mode!r}")
    layers = get_anatomy(model).layers
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq_len), generator=generator).to(model_device(model))
    started: dict[int, float] = {}
    samples: list[list[float]] = [[] for _ in layers]

    def before(pos):
        def hook(module, args):
            synchronize(model)
            started[pos] = time.perf_counter()
        return hook

    def after(pos):
        def hook(module, args, output):
            synchronize(model)
            samples[pos].append(time.perf_counter() - started[pos])
        return hook

    if mode == "decode":
        cache = model(input_ids=ids, use_cache=True).past_key_values
        step = ids[:, -1:]

        def forward():
            model(input_ids=step, past_key_values=cache, use_cache=True)
    else:
        def forward():
            model(input_ids=ids, use_cache=False)

    for _ in range(warmup):
        forward()
    handles = [h for pos, layer in enumerate(layers) for h in (
        layer.register_forward_pre_hook(before(pos)), layer.register_forward_hook(after(pos)))]
    try:
        totals = [timed(model, forward) for _ in range(runs)]
    finally:
        for handle in handles:
            handle.remove()
    layer_s = [statistics.median(s) for s in samples]
    total_s = statistics.median(totals)
    return {"mode": mode, "seq_len": seq_len, "runs": runs, "total_s": total_s, "layer_s": layer_s,
            "overhead_s": max(0.0, total_s - sum(layer_s))}
