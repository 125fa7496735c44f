"""layerprune: make language models shallower by removing whole decoder layers.

Importing the package is cheap and has no side effects: each public name below loads its module on first use
(PEP 562), so `layerprune --help` and `import layerprune` do not load torch.
"""

from layerprune.common.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    "PruneResult": "layerprune.api",
    "choose_layers": "layerprune.api",
    "prune_model": "layerprune.api",
    "LayerpruneError": "layerprune.errors",
    "LayerScores": "layerprune.importance",
    "available_metrics": "layerprune.importance",
    "compute_scores": "layerprune.importance",
    "register_metric": "layerprune.importance",
    "Anatomy": "layerprune.models.anatomy",
    "count_parameters": "layerprune.models.anatomy",
    "get_anatomy": "layerprune.models.anatomy",
    "register_family": "layerprune.models.anatomy",
    "LoadedModel": "layerprune.models.loading",
    "load_model": "layerprune.models.loading",
    "save_model": "layerprune.models.saving",
    "bypass_layers": "layerprune.models.bypass",
    "kept_layers": "layerprune.models.surgery",
    "remove_layers": "layerprune.models.surgery",
    "untie_embeddings": "layerprune.models.surgery",
    "Selection": "layerprune.selection.ranking",
    "select_layers": "layerprune.selection.ranking",
}

__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_exports(globals(), _PUBLIC)
