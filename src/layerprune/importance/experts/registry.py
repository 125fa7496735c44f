"""Registry of expert metrics: `@register_expert_metric(name, ...)`; unknown or duplicate names are errors.

A metric turns one MoE layer's routing statistics (routing.py; None for metrics without calibration) into one
score per current expert of that layer (higher = keep):
    fn(stats: LayerRouting | None, layer: int (ORIGINAL index), n_experts: int, **params) -> list[float]
Every calibration metric shares one pass (`compute_expert_scores` runs it once for all requested metrics).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from layerprune.common.registry import Registry
from layerprune.errors import LayerpruneError
from layerprune.importance.experts.routing import routing_pass
from layerprune.models.experts.anatomy import moe_layers
from layerprune.models.experts.surgery import expert_record

ExpertMetricFn = Callable[..., list]


@dataclass(frozen=True)
class ExpertMetricSpec:
    name: str
    fn: ExpertMetricFn
    description: str
    needs_calibration: bool = True
    needs_outputs: bool = False  # each expert's own output on its tokens (one more expert call per batch)


_METRICS: Registry[ExpertMetricSpec] = Registry("expert metric", ("layerprune.importance.experts.metrics",))


def register_expert_metric(name: str, *, description: str, needs_calibration: bool = True, needs_outputs: bool = False):
    def decorate(fn: ExpertMetricFn) -> ExpertMetricFn:
        _METRICS.add(name, ExpertMetricSpec(name, fn, description, needs_calibration, needs_outputs))
        return fn

    return decorate


def available_expert_metrics() -> list[str]:
    return _METRICS.names()


def get_expert_metric(name: str) -> ExpertMetricSpec:
    return _METRICS.lookup(name)


def parse_expert_metrics(value: str | list[str]) -> list[str]:
    """Names from "reap,frequency" (or a list), or "all"; unknown names are the registry's error."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value) if n.strip()]
    if names == ["all"]:
        return available_expert_metrics()
    if not names:
        raise LayerpruneError("no expert metric given")
    for name in names:
        get_expert_metric(name)
    return names


@dataclass
class ExpertScores:
    """One score per expert of every MoE layer. `layers`: ORIGINAL layer indices; `experts[i]`: the ORIGINAL
    indices of layer i's current experts; `values[i][j]`: the score of experts[i][j] (higher = keep)."""

    metric: str
    layers: list[int]
    experts: list[list[int]]
    values: list[list[float]]
    params: dict = field(default_factory=dict)
    calibration: dict | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict[int, dict[int, float]]:
        """{ORIGINAL layer: {ORIGINAL expert: score}}."""
        return {layer: dict(zip(experts, values)) for layer, experts, values in zip(self.layers, self.experts, self.values)}

    def to_json(self) -> dict:
        return asdict(self)


def compute_expert_scores(model, metrics: dict[str, dict] | str, calibration=None, *, batch_size: int = 8,
                          routing=routing_pass):
    """Score every expert of every MoE layer with one metric (a name: returns ExpertScores) or several
    ({name: params}: returns {name: ExpertScores}), sharing one calibration pass. routing: how the pass runs,
    routing(model, calibration, batch_size=, outputs=) -> {ORIGINAL layer: LayerRouting} (the loaded model's
    forward by default; importance/experts/streaming.py reads one layer at a time)."""
    single = isinstance(metrics, str)
    requests = {metrics: {}} if single else dict(metrics)
    specs = {name: get_expert_metric(name) for name in requests}
    needing = [name for name, spec in specs.items() if spec.needs_calibration]
    if needing and calibration is None:
        raise LayerpruneError(f"expert metric(s) {', '.join(needing)} need calibration data")
    layers = moe_layers(model)
    stats = {}
    if needing:
        outputs = any(specs[name].needs_outputs for name in needing)
        stats = routing(model, calibration, batch_size=batch_size, outputs=outputs)
    kept = expert_record(model)["kept"]
    results = {}
    for name, params in requests.items():
        spec = specs[name]
        values = [
            [float(v) for v in spec.fn(stats.get(layer.original), layer.original, layer.num_experts, **params)]
            for layer in layers
        ]
        results[name] = ExpertScores(
            metric=name,
            layers=[layer.original for layer in layers],
            experts=[list(kept[str(layer.original)]) for layer in layers],
            values=values,
            params=dict(params),
            calibration=getattr(calibration, "description", None) if spec.needs_calibration else None,
            extra={"tokens": {str(o): s.tokens for o, s in stats.items()}} if spec.needs_calibration else {},
        )
    return results[metrics] if single else results


def expert_scores_markdown(all_scores: dict[str, ExpertScores]) -> str:
    """Per metric and MoE layer: the experts from the lowest score (removed first) to the highest."""
    lines = ["| metric | layer | experts, lowest score first (original indices) |", "|---|---|---|"]
    for name, scores in all_scores.items():
        for layer, experts, values in zip(scores.layers, scores.experts, scores.values):
            order = [e for _, e in sorted(zip(values, experts), key=lambda pair: (pair[0], pair[1]))]
            lines.append(f"| {name} | {layer} | {', '.join(map(str, order))} |")
    return "\n".join(lines) + "\n"
