"""Healing a pruned model: partial-layer, LoRA, QLoRA, full, continued pretraining, distillation."""

from layerprune.finetune.config import HealConfig
from layerprune.finetune.methods import get_method, register_method, trainable_parameters
from layerprune.finetune.trainer import HealResult, heal

__all__ = ["HealConfig", "HealResult", "get_method", "heal", "register_method", "trainable_parameters"]
