"""Healing a pruned model: partial-layer, LoRA, QLoRA, full, continued pretraining, distillation, and healing
at the cuts (training-free linear replacement, block-local training)."""

from layerprune.finetune import local  # noqa: F401  (registers replace and block-local)
from layerprune.finetune.config import HealConfig
from layerprune.finetune.methods import get_method, register_method, trainable_parameters
from layerprune.finetune.trainer import HealResult, heal

__all__ = ["HealConfig", "HealResult", "get_method", "heal", "register_method", "trainable_parameters"]
