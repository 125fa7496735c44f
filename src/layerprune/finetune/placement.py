"""Where healing holds its models, and in which dtype, decided before they load.

Frozen weights (a teacher that only gives its targets or its responses, the base under a LoRA adapter) are held
in the checkpoint's 16-bit dtype wherever the device training computes on does that dtype natively, fp32 where it
is emulated: one decision, hardware.compute.frozen_dtype, for the device of hardware.devices.training_device. They
are loaded in that dtype directly (never fp32 first, then cast) and, for a teacher, on that device: on a GPU the
teacher pass runs on the GPU, with the teacher alone there. Weights that train stay in `train_dtype`.
"""

from __future__ import annotations

import torch

from layerprune.errors import LayerpruneError
from layerprune.finetune.config import HealConfig
from layerprune.finetune.fit import FULL_WEIGHT_METHODS
from layerprune.finetune.methods import get_method
from layerprune.finetune.teacher_checks import check_vocab_sizes
from layerprune.hardware.compute import compute_choice, frozen_dtype
from layerprune.hardware.devices import fsdp_launched, training_device
from layerprune.models.dtypes import stored_dtype
from layerprune.models.loading import load_model, model_folder
from layerprune.models.model_config import read_model_config


def folder_dtype(ref: str) -> torch.dtype | None:
    """The dtype a model's checkpoint stores its weights in (None: a hub id or a config that says nothing)."""
    try:
        return stored_dtype(read_model_config(model_folder(ref)))
    except (LayerpruneError, OSError, ValueError):
        return None


def held_dtype(ref: str, config: HealConfig, device: str | None = None) -> torch.dtype:
    """The dtype frozen weights of the checkpoint at `ref` are held in while healing computes on `device`
    (default: the training device) under config.bf16."""
    return frozen_dtype(compute_choice(device or training_device(), config.bf16), folder_dtype(ref))


def teacher_loader(student_vocab: int, teacher_ref: str, config: HealConfig, *, frozen: bool = True):
    """A function that loads the teacher; nothing else holds what it returns, so the caller frees it.

    frozen: the teacher only gives its top-k targets, its states or its responses (distillation, `responses:
    teacher`): held as `held_dtype` says, on the training device. Otherwise (the least-squares replacement at
    the cuts reads its hidden states in fp32) in `train_dtype` on the CPU, as before."""
    def load_teacher():
        if frozen:
            device = training_device()
            teacher = load_model(teacher_ref, dtype=held_dtype(teacher_ref, config, device), load_tokenizer=False,
                                 device_map=None if device == "cpu" else {"": device}).model
        else:
            teacher = load_model(teacher_ref, dtype=config.train_dtype, load_tokenizer=False).model
        check_vocab_sizes(student_vocab, teacher.get_output_embeddings().weight.shape[0], teacher_ref)
        return teacher

    return load_teacher


def trains_lora(config: HealConfig) -> bool:
    """Whether this (adapter-resolved) config trains a LoRA adapter over a frozen base (QLoRA's is 4-bit)."""
    return config.method == "lora" or (config.method in FULL_WEIGHT_METHODS and config.adapter == "lora")


def student_dtype(ref: str, config: HealConfig) -> str | torch.dtype:
    """The dtype to load the model to heal in: under LoRA the frozen base's (so a 16-bit base is never loaded in
    fp32 first: methods.Lora then finds it held already), else train_dtype. `config.adapter` must be resolved
    (finetune/fit.py) before: with `auto` the base is loaded as train_dtype says."""
    if trains_lora(config) and get_method(config.method).run is None:
        held = held_dtype(ref, config, prepared_on(config))  # as methods.Lora decides it there
        if held != torch.float32:
            return held
    return config.train_dtype


def prepared_on(config: HealConfig) -> str:
    """The device the model to heal is on when its method prepares it: the training device, except under FSDP
    (accelerate shards it later) and for QLoRA (its 4-bit copy is placed by the method; the full-precision model
    it merges into stays in host memory), where it stays on the CPU."""
    device = training_device()
    return "cpu" if config.method == "qlora" or fsdp_launched() else device


def on_training_device(model, config: HealConfig):
    """The model moved to `prepared_on(config)` before the method prepares it and the step is timed, so both see
    the device training computes on (the Trainer would move it at its start anyway); a model spread over devices
    already stays."""
    device = prepared_on(config)
    if device == "cpu" or getattr(model, "hf_device_map", None):
        return model
    return model.to(device)
