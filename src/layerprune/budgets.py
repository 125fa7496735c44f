"""Pruning budgets: how many layers to drop so that the pruned model meets a target size or speed.

A budget is exactly one of: a number of layers, a ratio of the layers, a parameter count
(`target_params`, e.g. "100M") or a latency ratio (`target_latency`, e.g. 0.75 = the pruned model
takes at most 75% of the original's time). The two targets try the metric's own drop-set for
k = 1, 2, ... layers and stop at the first that fits: the fewest layers that meet the target, in
the metric's order, protected layers never dropped.
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.importance.base import LayerScores
from layerprune.selection import Selection, count_to_drop, select_layers
from layerprune.timing import model_device, synchronize, timed

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


def fewest_layers(
    scores: LayerScores,
    value_after: Callable[[list[int]], float],
    target: float,
    *,
    protect_first: int = 0,
    protect_last: int = 0,
) -> tuple[Selection | None, tuple[list[int], float] | None]:
    """(the smallest drop-set whose value_after(dropped) <= target or None, the last drop-set tried and its value)."""
    last = None
    for k in range(1, len(scores.layers)):
        try:
            selection = select_layers(scores, num_layers=k, protect_first=protect_first, protect_last=protect_last)
        except LayerpruneError:  # protection (or a block table) allows no more layers
            break
        value = value_after(selection.dropped)
        if value <= target:
            return selection, (selection.dropped, value)
        last = (selection.dropped, value)
    return None, last


def _per_layer(model: nn.Module, scores: LayerScores, values: list) -> dict[int, float]:
    """Map per-position numbers of the current model onto ORIGINAL indices, checking the scores match it."""
    from layerprune.models.surgery import kept_layers

    kept = kept_layers(model)
    if kept != list(scores.layers):
        raise LayerpruneError(f"the {scores.metric} scores are for layers {scores.layers}, but the model has {kept}")
    return dict(zip(kept, values))


def _most(scores: LayerScores, last: tuple[list[int], float] | None) -> str:
    if last is None:
        return "no layer may be dropped, which"
    return f"dropping the most layers allowed ({len(last[0])} of {len(scores.layers)})"


def select_for_params(
    model: nn.Module, scores: LayerScores, target_params: int | str, *, protect_first: int = 0, protect_last: int = 0
) -> Selection:
    """Fewest layers whose removal leaves at most target_params parameters (layer sizes from the model, no forward)."""
    from layerprune.models.anatomy import count_parameters

    target = parse_param_count(target_params)
    params = count_parameters(model)
    per_layer = _per_layer(model, scores, params["per_layer"])
    total = params["total"]
    if total <= target:
        raise LayerpruneError(f"target_params {target_params} ({target:,}) needs no pruning: the model has "
                              f"{total:,} parameters")

    def after(drop: list[int]) -> float:
        return total - sum(per_layer[i] for i in drop)

    selection, last = fewest_layers(scores, after, target, protect_first=protect_first, protect_last=protect_last)
    if selection is None:
        outside = total - sum(per_layer.values())
        raise LayerpruneError(f"target_params {target_params} ({target:,}) is unreachable: {_most(scores, last)} "
                              f"leaves {int(last[1] if last else total):,} parameters ({outside:,} outside the layers)")
    selection.constraints.update(target_params=target, params_before=total, params_after=int(after(selection.dropped)))
    return selection


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
    costs = costs or measure_layer_costs(model, mode=mode)
    per_layer = _per_layer(model, scores, costs["layer_s"])
    total = costs["total_s"]

    def ratio(drop: list[int]) -> float:
        return (total - sum(per_layer[i] for i in drop)) / total

    selection, last = fewest_layers(scores, ratio, target_latency, protect_first=protect_first,
                                    protect_last=protect_last)
    mode = costs.get("mode", mode)
    if selection is None:
        raise LayerpruneError(f"target_latency {target_latency} is unreachable: {_most(scores, last)} leaves "
                              f"{last[1] if last else 1.0:.3f} of the measured {mode} latency "
                              f"({costs['overhead_s'] / total:.3f} is outside the layers)")
    selection.constraints.update(target_latency=target_latency, estimated_latency_ratio=ratio(selection.dropped),
                                 latency=costs)
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
    from layerprune.models.anatomy import get_anatomy

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
