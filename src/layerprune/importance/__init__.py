"""Layer importance metrics. Importing this package registers every built-in metric."""

from layerprune.importance import activations, branches, order, perplexity, weights  # noqa: F401  (register metrics)
from layerprune.importance.base import LayerScores
from layerprune.importance.registry import (
    available_metrics,
    compute_many,
    compute_scores,
    get_metric,
    register_group,
    register_metric,
)

__all__ = [
    "LayerScores",
    "available_metrics",
    "compute_many",
    "compute_scores",
    "get_metric",
    "register_group",
    "register_metric",
]
