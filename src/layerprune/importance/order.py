"""Data-free baselines that score layers by position (ShortGPT, arXiv 2403.03853; arXiv 2411.15558)."""

from __future__ import annotations

import random as _random

from layerprune.importance.registry import register_metric
from layerprune.models.surgery import kept_layers

# Position says as much about a layer's attention or MLP as about the whole layer.
_ANY_UNIT = ("block", "attention", "mlp")


@register_metric("reverse-order", needs_calibration=False, description="n - i: deeper layers are dropped first",
                 granularities=_ANY_UNIT)
def reverse_order(model, calibration=None) -> list[float]:
    n = len(kept_layers(model))
    return [float(n - pos) for pos in range(n)]


@register_metric("sequential", needs_calibration=False, description="i: shallow layers are dropped first",
                 granularities=_ANY_UNIT)
def sequential(model, calibration=None) -> list[float]:
    return [float(pos) for pos in range(len(kept_layers(model)))]


@register_metric("random", needs_calibration=False, description="a seeded random permutation",
                 granularities=_ANY_UNIT, default_params=lambda cut: {"seed": cut.seed})
def random(model, calibration=None, seed: int = 0) -> list[float]:
    n = len(kept_layers(model))
    values = list(range(n))
    _random.Random(seed).shuffle(values)
    return [float(v) for v in values]
