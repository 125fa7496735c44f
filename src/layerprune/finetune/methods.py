"""Healing methods: how a pruned model is made trainable and turned back into a stock model.

Each method is `prepare(model, config, context) -> trainable model` and
`finalize(trained, config, context) -> stock transformers model`; register new ones with
`@register_method`. `config` is a layerprune.finetune.HealConfig (not imported here: the config checks
method names against this registry).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.models.anatomy import get_anatomy
from layerprune.models.quantize import bnb_config, disable_cpu_repacking
from layerprune.models.surgery import kept_layers, untie_embeddings


@dataclass
class HealContext:
    """What methods may need besides the model: the tokenizer, a teacher, scratch space."""

    tokenizer: object = None
    teacher: nn.Module | None = None
    notes: dict = field(default_factory=dict)


@dataclass(frozen=True)
class HealMethod:
    name: str
    prepare: Callable
    finalize: Callable
    raw_text: bool = False  # trains on raw text (causal LM loss on every token)


_METHODS: dict[str, HealMethod] = {}


def register_method(name: str, *, raw_text: bool = False):
    def decorate(cls):
        if name in _METHODS:
            raise ValueError(f"healing method {name!r} is already registered")
        _METHODS[name] = HealMethod(name, cls.prepare, cls.finalize, raw_text)
        return cls

    return decorate


def get_method(name: str) -> HealMethod:
    if name not in _METHODS:
        raise LayerpruneError(f"unknown healing method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) unique parameters."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def layers_to_train(model: nn.Module, config) -> list[int]:
    """Positions of the layers partial fine-tuning trains (from original indices or the last K)."""
    kept = kept_layers(model)
    if config.train_layers is not None:
        missing = [i for i in config.train_layers if i not in kept]
        if missing:
            raise LayerpruneError(f"train_layers {missing} are not in the model (its original layers: {kept})")
        return [kept.index(i) for i in config.train_layers]
    k = config.train_last_layers
    if k > len(kept):
        raise LayerpruneError(f"cannot train the last {k} layers of a {len(kept)}-layer model")
    return list(range(len(kept) - k, len(kept)))


@register_method("partial")
class Partial:
    """lm_head + the last K layers (Reassessing Layer Pruning, arXiv 2411.15558, Insight #2); the frozen
    prefix builds no autograd graph.

    A tied lm_head is untied first: training it would otherwise train the input embeddings and
    backpropagate through every layer. The untied copy costs vocab x hidden parameters on disk.
    """

    @staticmethod
    def prepare(model, config, context: HealContext):
        positions = layers_to_train(model, config)
        if config.train_lm_head and untie_embeddings(model):
            context.notes["untied_embeddings"] = True
        model.requires_grad_(False)
        anatomy = get_anatomy(model)
        for pos in positions:
            anatomy.layers[pos].requires_grad_(True)
        if config.train_lm_head:
            anatomy.lm_head.requires_grad_(True)
        if not any(p.requires_grad for p in model.parameters()):
            raise LayerpruneError("partial fine-tuning with no layer and no lm_head to train")
        context.notes["trained_layers"] = [kept_layers(model)[p] for p in positions]
        return model

    @staticmethod
    def finalize(model, config, context):
        model.requires_grad_(True)
        return model


@register_method("full")
class Full:
    """Every weight trains."""

    @staticmethod
    def prepare(model, config, context):
        model.requires_grad_(True)
        return model

    @staticmethod
    def finalize(model, config, context):
        return model


@register_method("cpt", raw_text=True)
class ContinuedPretraining(Full):
    """Full-weight training on raw text with the causal LM loss on every token (Shortened LLaMA's CPT)."""


@register_method("distill")
class Distill(Full):
    """Full-weight training against the unpruned teacher's logits (KL, optionally + CE), as Minitron does."""


def _lora_config(config):
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.lora_target,
        task_type="CAUSAL_LM",
    )


def _merge_adapters(peft_model):
    """The stock model with the LoRA adapters merged into its weights, every weight trainable again."""
    merged = peft_model.merge_and_unload()
    merged.requires_grad_(True)
    return merged


@register_method("lora")
class Lora:
    """peft LoRA (r=8 as in arXiv 2411.15558) on every linear projection of the blocks; merged at the end."""

    @staticmethod
    def prepare(model, config, context):
        from peft import get_peft_model

        return get_peft_model(model, _lora_config(config))

    @staticmethod
    def finalize(model, config, context):
        return _merge_adapters(model)


@register_method("qlora")
class QLora:
    """LoRA on an nf4-quantized copy (bitsandbytes); the adapters are merged into the full-precision model."""

    @staticmethod
    def prepare(model, config, context):
        from peft import get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM

        compute_dtype = torch.bfloat16 if _wants_bf16(config) else torch.float32
        context.notes["full_precision"] = model
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            quantized = AutoModelForCausalLM.from_pretrained(
                tmp,
                quantization_config=bnb_config("4bit", compute_dtype),
                device_map={"": next(model.parameters()).device},
            )
        disable_cpu_repacking(quantized)
        quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=config.gradient_checkpointing)
        return get_peft_model(quantized, _lora_config(config))

    @staticmethod
    def finalize(model, config, context):
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        adapters = get_peft_model_state_dict(model)
        full = get_peft_model(context.notes.pop("full_precision"), _lora_config(config))
        set_peft_model_state_dict(full, adapters)
        return _merge_adapters(full)


def _wants_bf16(config) -> bool:
    if config.bf16 == "auto":
        return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else True
    return bool(config.bf16)
