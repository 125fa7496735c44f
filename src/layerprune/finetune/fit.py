"""`adapter: auto`: healing's own policy for this machine: every weight where full-weight training fits, else a
LoRA adapter, else one error naming what fits (finetune/memory.py counts the bytes)."""

from __future__ import annotations

from layerprune.errors import LayerpruneError
from layerprune.finetune.memory import heal_memory
from layerprune.hardware.devices import USABLE, Devices, GiB, this_machine
from layerprune.models.shape import Job, shape_from_config

FULL_WEIGHT_METHODS = ("full", "cpt", "distill")


def fit_heal(config, model_config, *, devices: Devices | None = None, loaded_bytes: int = 0, log=print):
    """`adapter: auto` resolved for this machine: every weight where full-weight training fits, else LoRA;
    neither: one error with what each needs and the options that fit. loaded_bytes: memory the model to
    heal already holds (it is part of the plan's count, so it is added back to what is available)."""
    from dataclasses import replace as with_changes

    if config.adapter != "auto":
        return config
    if config.method not in FULL_WEIGHT_METHODS:
        return config.model_copy(update={"adapter": "none"})
    shape = shape_from_config(model_config)
    devices = devices or this_machine()
    if devices.kind == "cpu" and loaded_bytes:
        devices = with_changes(devices, memory=devices.memory + loaded_bytes)
    if devices.memory <= 0:
        return config.model_copy(update={"adapter": "none"})  # memory unknown: the default recipe
    job = Job(layers_kept=shape.layers, batch=config.batch_size, seq_len=config.max_length,
              loss_chunk=config.loss_chunk, gradient_checkpointing=config.gradient_checkpointing,
              lora_r=config.lora_r)
    needs = {option: heal_memory(option, shape, job, devices).bytes_per_device for option in ("full", "lora")}
    limit = USABLE * devices.memory
    if needs["full"] <= limit:
        return config.model_copy(update={"adapter": "none"})
    sizes = f"full weights need {needs['full'] / GiB:.1f} GiB, LoRA {needs['lora'] / GiB:.1f} GiB"
    if needs["lora"] <= limit:
        log(f"adapter auto: {sizes}, {devices.describe()}: healing a LoRA adapter (merged at the end)")
        return config.model_copy(update={"adapter": "lora"})
    raise LayerpruneError(
        f"healing {shape.params() / 1e9:.1f}B parameters does not fit {devices.describe()}: {sizes}. Options: "
        "--method qlora (a GPU), --gradient-checkpointing, a smaller --batch-size, or layer by layer: "
        "--method replace --streaming (see `layerprune plan MODEL`)")
