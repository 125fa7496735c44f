"""Registry of importance metrics: `@register_metric(name)`; unknown or duplicate names are errors.

A metric function has one signature:
    fn(model, calibration, **params) -> list[float] | (list[float], extra: dict)
returning one score per CURRENT layer, in model order (higher = keep).

Metrics that come from the same forward pass (e.g. block-influence, relative-magnitude,
angular) declare a `group`; `compute_many` then runs the group's pass once for all of them.
A group function has the signature:
    group_fn(model, calibration, requests: dict[metric name, params]) -> dict[metric name, list | (list, extra)]

A metric scores whole layers unless it declares other `granularities` ("block", "attention", "mlp"):
the unit that `prune --granularity` removes must be the unit the metric scored.

`default_params(cut)` gives a metric's parameters for a prune (a `Cut`: how many layers the model has,
how many are to go, the seed), so no caller needs to know metric names: e.g. angular distance scores
blocks as long as the cut, the random baseline takes the seed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from layerprune.common.registry import Registry
from layerprune.errors import LayerpruneError
from layerprune.importance.base import LayerScores
from layerprune.models.finite import check_finite_parameters
from layerprune.models.surgery import kept_layers

MetricFn = Callable[..., object]
GroupFn = Callable[..., dict]


@dataclass(frozen=True)
class Cut:
    """What a prune asks of the metrics: the current layer count, how many go (1 when a parameter or latency
    target decides later), and the seed."""

    n_layers: int
    n_drop: int = 1
    seed: int = 0


def no_params(cut: Cut) -> dict:
    return {}


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: MetricFn
    needs_calibration: bool
    description: str
    group: str | None = None
    granularities: tuple[str, ...] = ("block",)
    default_params: Callable[[Cut], dict] = no_params
    # forward passes over the calibration text for a model of n layers (time estimates; None: one pass)
    forward_passes: Callable[[int], float] | None = None


_METRICS: Registry[MetricSpec] = Registry("metric")
_GROUPS: Registry[GroupFn] = Registry("metric group")


def register_metric(
    name: str,
    *,
    needs_calibration: bool,
    description: str,
    group: str | None = None,
    granularities: tuple[str, ...] = ("block",),
    default_params: Callable[[Cut], dict] = no_params,
    forward_passes: Callable[[int], float] | None = None,
):
    def decorate(fn: MetricFn) -> MetricFn:
        _METRICS.add(name, MetricSpec(name, fn, needs_calibration, description, group, tuple(granularities),
                                      default_params, forward_passes))
        return fn

    return decorate


def register_group(name: str):
    """Register the function that computes every metric of a group in one pass."""

    def decorate(fn: GroupFn) -> GroupFn:
        _GROUPS.add(name, fn)
        return fn

    return decorate


def available_metrics() -> list[str]:
    return sorted(_METRICS)


def get_metric(name: str) -> MetricSpec:
    return _METRICS.lookup(name)


def check_granularity(name: str, granularity: str) -> None:
    """Refuse a metric that does not score the unit being removed (whole layers, attentions or MLPs)."""
    spec = get_metric(name)
    if granularity not in spec.granularities:
        fitting = [m for m in available_metrics() if granularity in _METRICS[m].granularities]
        scores = {"block": "whole layers", "attention": "attention branches", "mlp": "MLP branches"}
        raise LayerpruneError(
            f"metric {name!r} scores {' and '.join(scores.get(g, g) for g in spec.granularities)}, not "
            f"{scores.get(granularity, granularity)}; with granularity {granularity!r} use one of: {', '.join(fitting)}"
        )


def to_layer_scores(model, metric: str, result, params: dict, calibration) -> LayerScores:
    """A metric function's output (values, or (values, extra)) as LayerScores of the model's current layers."""
    values, extra = result if isinstance(result, tuple) else (result, {})
    return LayerScores(
        metric=metric,
        layers=kept_layers(model),
        values=[float(v) for v in values],
        params=dict(params),
        calibration=getattr(calibration, "description", None) if get_metric(metric).needs_calibration else None,
        extra=extra,
    )


def _check_calibration(name: str, calibration) -> None:
    if get_metric(name).needs_calibration and calibration is None:
        raise LayerpruneError(f"metric {name!r} needs calibration data")


def compute_scores(model, metric: str, calibration=None, **params) -> LayerScores:
    """Score every current layer of `model` with one metric; indices come out in original numbering."""
    _check_calibration(metric, calibration)
    return to_layer_scores(model, metric, get_metric(metric).fn(model, calibration, **params), params, calibration)


def compute_many(model, metrics: dict[str, dict], calibration=None) -> dict[str, LayerScores]:
    """Score with several metrics ({name: params}), sharing one pass per metric group."""
    for name in metrics:
        _check_calibration(name, calibration)
    check_finite_parameters(model, "its layer scores would all be NaN, so no layer could be chosen on them; "
                                   "repair or re-download the model")
    results: dict[str, LayerScores] = {}
    by_group: dict[str, dict[str, dict]] = {}
    for name, params in metrics.items():
        group = get_metric(name).group
        if group is None:
            results[name] = compute_scores(model, name, calibration, **params)
        else:
            by_group.setdefault(group, {})[name] = params
    for group, requests in by_group.items():
        outputs = _GROUPS[group](model, calibration, requests)
        for name, params in requests.items():
            results[name] = to_layer_scores(model, name, outputs[name], params, calibration)
    return {name: results[name] for name in metrics}
