"""Scores of decoder layers: the common currency of every metric.

Convention: higher score = more important = kept. Indices are ORIGINAL layer indices.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class LayerScores:
    metric: str
    layers: list[int]  # original indices, in model order
    values: list[float]  # one per layer; higher = keep
    params: dict = field(default_factory=dict)
    calibration: dict | None = None
    extra: dict = field(default_factory=dict)  # metric-specific tables (e.g. angular distances)

    def __post_init__(self) -> None:
        if len(self.layers) != len(self.values):
            raise ValueError(f"{self.metric}: {len(self.layers)} layers but {len(self.values)} scores")

    def as_dict(self) -> dict[int, float]:
        return dict(zip(self.layers, self.values))

    def ranking(self) -> list[int]:
        """Original indices from least to most important (ties: deeper layer first)."""
        return [layer for _, layer in sorted(zip(self.values, self.layers), key=lambda t: (t[0], -t[1]))]

    def to_json(self) -> dict:
        """A dict for JSON; NaN (e.g. an invalid block start) becomes null, as strict JSON has no NaN."""
        data = asdict(self)
        data["values"] = [None if v != v else v for v in self.values]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "LayerScores":
        values = [float("nan") if v is None else v for v in data["values"]]
        return cls(**{**data, "values": values})
