"""layerprune: make language models shallower by removing whole decoder layers.

Importing the package is cheap and has no side effects; heavy libraries load on use.
"""

from layerprune.api import PruneResult, choose_layers, prune_model
from layerprune.errors import LayerpruneError
from layerprune.importance import LayerScores, available_metrics, compute_scores, register_metric
from layerprune.models.anatomy import Anatomy, count_parameters, get_anatomy, register_family
from layerprune.models.loading import LoadedModel, load_model
from layerprune.models.saving import save_model
from layerprune.models.bypass import bypass_layers
from layerprune.models.surgery import kept_layers, remove_layers, untie_embeddings
from layerprune.selection.ranking import Selection, select_layers

__version__ = "0.1.0"

__all__ = [
    "Anatomy",
    "LayerScores",
    "LayerpruneError",
    "LoadedModel",
    "PruneResult",
    "Selection",
    "available_metrics",
    "bypass_layers",
    "choose_layers",
    "compute_scores",
    "count_parameters",
    "get_anatomy",
    "kept_layers",
    "load_model",
    "prune_model",
    "register_family",
    "register_metric",
    "remove_layers",
    "save_model",
    "select_layers",
    "untie_embeddings",
]
