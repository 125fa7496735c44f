"""Healing a pruned model: partial-layer, LoRA, QLoRA, full, continued pretraining, distillation, and healing
at the cuts (training-free linear replacement, block-local training). The public names load on first use, so
reading HealConfig's fields (`layerprune --help`) does not load torch."""

from layerprune.common.lazy import lazy_exports

_PUBLIC = {
    "HealConfig": "layerprune.finetune.config",
    "HealResult": "layerprune.finetune.trainer",
    "heal": "layerprune.finetune.trainer",
    "get_method": "layerprune.finetune.methods",
    "register_method": "layerprune.finetune.methods",
    "trainable_parameters": "layerprune.finetune.methods",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_exports(globals(), _PUBLIC)
