"""The settings of one healing run, validated before any model loads.

Defaults are the main seed's (reassessing-layer-pruning.txt section 4.2): AdamW, lr 1e-5 with 100
warmup steps, effective batch 64, 2 epochs, LoRA r=8, partial = lm_head + last 3 layers. They were
found on 7-8B models; on SmolLM2-135M lr 1e-4 heals far better (FINDINGS.md), which is what the
quickstart uses.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Method = Literal["partial", "lora", "qlora", "full", "cpt", "distill"]


class HealConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: Method = Field("partial", description="partial | lora | qlora | full | cpt | distill")
    learning_rate: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    epochs: float = Field(2.0, gt=0, description="Passes over the data (ignored when max_steps > 0).")
    max_steps: int = Field(-1, description="Stop after this many optimizer steps (-1: use epochs).")
    batch_size: int = Field(8, ge=1, description="Micro-batch per device.")
    effective_batch_size: int = Field(64, ge=1, description="Examples per optimizer step, via gradient accumulation.")
    warmup_steps: int = Field(100, ge=0)
    scheduler: str = Field("linear", description="transformers lr scheduler type.")
    weight_decay: float = Field(0.0, ge=0)
    max_length: int = Field(1024, ge=8, description="Tokens per example (seed: 1024 for Dolly, 512 for MMLU).")
    packing: bool = Field(False, description="Pack several examples into one sequence.")
    # partial-layer fine-tuning
    train_last_layers: int = Field(3, ge=0, description="partial: train the last K remaining layers.")
    train_layers: list[int] | None = Field(None, description="partial: ORIGINAL indices of layers to train instead.")
    train_lm_head: bool = Field(True, description="partial: train lm_head (unties tied embeddings).")
    # LoRA / QLoRA
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    lora_target: list[str] | Literal["all-linear"] = Field("all-linear", description="Module names, or all-linear.")
    # distillation
    teacher: str | None = Field(None, description="distill: teacher model ref (default: the model it was pruned from).")
    distill_temperature: float = Field(2.0, gt=0)
    distill_alpha: float = Field(1.0, ge=0, le=1, description="Weight of the KL term; 1 - alpha weighs the CE loss.")
    # runtime
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 autocast (auto: on where the hardware supports it).")
    gradient_checkpointing: bool = False
    seed: int = 0
    logging_steps: int = Field(1, ge=1)
    save_steps: int | None = Field(None, ge=1, description="Save a checkpoint every N steps (for --resume).")

    @model_validator(mode="after")
    def _check(self) -> "HealConfig":
        if self.effective_batch_size < self.batch_size:
            raise ValueError("effective_batch_size must be >= batch_size")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be -1 (use epochs) or >= 1")
        return self
