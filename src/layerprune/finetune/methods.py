"""Healing methods: how a pruned model is made trainable and turned back into a stock model.

Each method is `prepare(model, config, context) -> trainable model` and
`finalize(trained, config, context) -> stock transformers model`; register new ones with
`@register_method`. `config` is a layerprune.finetune.HealConfig (not imported here: the config checks
method names against this registry).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from layerprune.common.registry import Registry
from layerprune.errors import LayerpruneError
from layerprune.finetune.hidden_states import dropped_runs
from layerprune.hardware.compute import compute_choice, frozen_dtype
from layerprune.hardware.devices import training_device
from layerprune.models.anatomy import get_anatomy
from layerprune.models.dtypes import stored_dtype
from layerprune.models.model_config import read_model_config, trusts_remote_code
from layerprune.models.quantize import bnb_config, disable_cpu_repacking
from layerprune.models.sublayer import removed_sublayers
from layerprune.models.surgery import kept_layers, provenance, untie_embeddings


@dataclass
class HealContext:
    """What methods may need besides the model, and what they hand back besides it.

    notes: what heal.json records of the run (each method adds its own keys). The rest are typed outputs
    that the training loop reads: a procedure (replace, block-local) reports the cuts it changed, the
    parameters and tokens, and its loss curve; QLoRA keeps the full-precision model its adapter merges into."""

    tokenizer: object = None
    teacher: nn.Module | None = None
    notes: dict = field(default_factory=dict)
    cuts: list[dict] = field(default_factory=list)  # a procedure's record of each cut it healed
    changed_params: int = 0  # parameters a procedure changed
    tokens: int = 0  # tokens a procedure read
    loss_curve: list[dict] = field(default_factory=list)  # a procedure's own loss curve
    full_precision: nn.Module | None = None  # QLoRA: the unquantized model the adapter is merged into


@dataclass(frozen=True)
class HealMethod:
    name: str
    prepare: Callable | None
    finalize: Callable | None
    raw_text: bool = False  # trains on raw text only (causal LM loss on every token)
    default_data: str = "dolly"  # the bundled data it trains on when none is given
    needs_teacher: bool = False  # reads the unpruned model (distillation, replacement, block-local)
    run: Callable | None = None  # run(model, rows, config, context) -> model: a procedure instead of the Trainer
    distills: bool = False  # the Trainer's loss is distillation toward the teacher's logits


# replace and block-local register from finetune/local.py, loaded at the first lookup
_METHODS: Registry[HealMethod] = Registry("healing method", builtins=("layerprune.finetune.local",))


def register_method(name: str, *, raw_text: bool = False, default_data: str | None = None,
                    needs_teacher: bool = False, distills: bool = False):
    """Register a class with `prepare`/`finalize` (trained by the Trainer) or with `run` (its own procedure)."""

    def decorate(cls):
        data = default_data or ("c4" if raw_text else "dolly")
        _METHODS.add(name, HealMethod(name, getattr(cls, "prepare", None), getattr(cls, "finalize", None), raw_text,
                                    data, needs_teacher or distills, getattr(cls, "run", None), distills))
        return cls

    return decorate


def get_method(name: str) -> HealMethod:
    return _METHODS.lookup(name)


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


def freeze_parts(model: nn.Module, freeze: str) -> list[str]:
    """Freeze what `freeze` names (none | embeddings | prefix); returns the frozen parts, for the record.

    The layers before the first cut see the same input as in the unpruned model and compute the same output;
    the last of them feeds the cut and trains (it takes over the removed layers' work, and the hidden-state
    loss acts on its output). Frozen embeddings and prefix build no autograd graph, so the backward pass
    stops at the first trained layer."""
    if freeze == "none":
        return []
    anatomy = get_anatomy(model)
    anatomy.embeddings.requires_grad_(False)  # a tied lm_head is the same tensor: frozen with it
    frozen = ["embeddings"]
    if freeze == "prefix":
        kept = kept_layers(model)
        runs = dropped_runs(provenance(model)["dropped_layers"])
        # a layer whose attention or MLP was removed is changed too: its input is the first that differs
        changed = [runs[0][0]] if runs else []
        changed += [layer for layers in removed_sublayers(model).values() for layer in layers]
        first = min(changed) if changed else len(kept)  # nothing removed: every layer but the last is "before the cut"
        stop = kept.index(first - 1) if first > 0 else 0  # the layer that feeds the first cut trains
        for pos in range(stop):
            anatomy.layers[pos].requires_grad_(False)
        frozen.append(f"layers {kept[:stop]}" if stop else "no layer (the cut is at the start)")
    return frozen


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
    """Every weight trains (adapter "none"), or a LoRA adapter merged at the end (adapter "lora": the
    embeddings stay as they were, tied ones tied)."""

    @staticmethod
    def prepare(model, config, context):
        if config.adapter == "lora":
            return Lora.prepare(model, config, context)
        model.requires_grad_(True)
        frozen = freeze_parts(model, config.freeze)
        if frozen:
            context.notes["frozen"] = frozen
        return model

    @staticmethod
    def finalize(model, config, context):
        if config.adapter == "lora":
            return Lora.finalize(model, config, context)
        model.requires_grad_(True)
        return model


@register_method("cpt", raw_text=True)
class ContinuedPretraining(Full):
    """Training on raw text with the causal LM loss on every token (Shortened LLaMA's CPT)."""


# The default data: 3 blocks of general text per instruction example (chat template), measured best on what
# users notice (task accuracy, instruction following) at equal perplexity; docs/results.md.
@register_method("distill", default_data="c4:3+dolly:1", distills=True)
class Distill(Full):
    """Training toward the unpruned teacher's next-token distribution (KL on its top-k logits, optionally +
    CE), as Minitron (arXiv 2407.14679) does; on general text by default."""


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

        held = frozen_dtype(heal_compute(model, config), checkpoint_dtype(model))
        peft_model = get_peft_model(model, _lora_config(config))  # adapters in fp32 (peft upcasts them)
        hold_frozen_weights(peft_model, held)
        frozen = {str(p.dtype).removeprefix("torch.") for p in peft_model.parameters() if not p.requires_grad}
        context.notes["frozen_dtype"] = ",".join(sorted(frozen))  # heal.json: how the base was held
        return peft_model

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

        device = training_device()  # the 4-bit copy trains there; the full-precision model stays where it is
        choice = compute_choice(device, config.bf16)
        compute_dtype = torch.float32 if choice.dtype == "fp32" else choice.torch_dtype
        context.full_precision = model
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            quantized = AutoModelForCausalLM.from_pretrained(
                tmp,
                quantization_config=bnb_config("4bit", compute_dtype),
                device_map={"": device},
                trust_remote_code=trusts_remote_code(),  # as the model was loaded: never a terminal prompt
            )
        disable_cpu_repacking(quantized)
        quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=config.gradient_checkpointing)
        return get_peft_model(quantized, _lora_config(config))

    @staticmethod
    def finalize(model, config, context):
        from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

        adapters = get_peft_model_state_dict(model)
        full, context.full_precision = get_peft_model(context.full_precision, _lora_config(config)), None
        set_peft_model_state_dict(full, adapters)
        return _merge_adapters(full)


def checkpoint_dtype(model) -> torch.dtype | None:
    """The dtype the loaded model's checkpoint stores its weights in (its folder's config), or None for a model
    built in memory or a folder whose config says nothing usable."""
    folder = Path(str(getattr(model, "name_or_path", "") or ""))
    if not str(folder) or not (folder / "config.json").is_file():
        return None
    try:
        return stored_dtype(read_model_config(folder))
    except LayerpruneError:
        return None


def hold_frozen_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen floating-point parameters (the base under an adapter) to `dtype`, one at a time (the
    fp32 copy of each is freed as it goes); trainable parameters and buffers (rotary frequencies) stay."""
    if dtype == torch.float32:
        return
    for param in model.parameters():
        if not param.requires_grad and param.is_floating_point() and param.dtype == torch.float32:
            param.data = param.data.to(dtype)


def heal_compute(model, config):
    """How healing computes on the model's device: hardware.compute decides from `config.bf16`."""
    return compute_choice(next(model.parameters()).device, config.bf16)
