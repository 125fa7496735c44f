"""Layer importance metrics. Importing this package registers every built-in metric."""

from layerprune.importance import order  # noqa: F401  (registers the metrics)
from layerprune.importance.base import LayerScores
from layerprune.importance.registry import available_metrics, compute_scores, get_metric, register_metric

__all__ = ["LayerScores", "available_metrics", "compute_scores", "get_metric", "register_metric"]
