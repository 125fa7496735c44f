"""Registry of importance metrics: `@register_metric(name)`; unknown or duplicate names are errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from layerprune.errors import LayerpruneError
from layerprune.importance.base import LayerScores
from layerprune.models.surgery import kept_layers

# fn(model, calibration, **params) -> one score per CURRENT layer, in model order.
MetricFn = Callable[..., list[float]]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: MetricFn
    needs_calibration: bool
    description: str


_METRICS: dict[str, MetricSpec] = {}


def register_metric(name: str, *, needs_calibration: bool, description: str):
    def decorate(fn: MetricFn) -> MetricFn:
        if name in _METRICS:
            raise ValueError(f"metric {name!r} is already registered")
        _METRICS[name] = MetricSpec(name, fn, needs_calibration, description)
        return fn

    return decorate


def available_metrics() -> list[str]:
    return sorted(_METRICS)


def get_metric(name: str) -> MetricSpec:
    if name not in _METRICS:
        raise LayerpruneError(f"unknown metric {name!r}; available: {', '.join(available_metrics())}")
    return _METRICS[name]


def compute_scores(model, metric: str, calibration=None, **params) -> LayerScores:
    """Score every current layer of `model` with one metric; indices come out in original numbering."""
    spec = get_metric(metric)
    if spec.needs_calibration and calibration is None:
        raise LayerpruneError(f"metric {metric!r} needs calibration data")
    values = spec.fn(model, calibration, **params)
    return LayerScores(
        metric=metric,
        layers=kept_layers(model),
        values=[float(v) for v in values],
        params=params,
        calibration=getattr(calibration, "description", None),
    )
