"""The settings of one healing stage, validated before any model loads.

The defaults are the recipe measured best on the embedded SmolLM2-135M-Instruct with 25% of its layers
removed (docs/results.md, "Healing study"): 150 steps of full-weight distillation toward the unpruned model
on general C4 text (4 x 256 tokens per step, AdamW lr 3e-4), the loss half KL to the teacher's top-64
logits at temperature 1, half cross-entropy on the text itself. KL alone heals held-out perplexity much
more slowly, and the training-free linear replacement (ReplaceMe, arXiv 2505.02819) as a starting point
did not help the trained methods there, so it is a method of its own (`replace`) and an opt-in start
(`init: replace`). The recipe of "Reassessing Layer Pruning in LLMs" (arXiv 2411.15558, found on 7-8B
models: partial-layer on instructions, lr 1e-5, 2 epochs, effective batch 64) is the preset `paper`; on a
135M model it leaves the pruned model unusable.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from layerprune.common.config_base import StrictConfig, apply_preset
from layerprune.data.instructions import FieldMap
from layerprune.errors import LayerpruneError

# The longest time budget (about two years): past it the deadline arithmetic overflows (1e308 minutes).
MAX_MINUTES = 1e6

# Named recipes: a preset fills every setting it names unless the setting is given explicitly.
HEAL_PRESETS: dict[str, dict] = {
    "paper": {  # arXiv 2411.15558 section 4.2: lm_head + last 3 layers, AdamW lr 1e-5, 2 epochs, batch 64
        "method": "partial", "init": "none", "data": "dolly", "learning_rate": 1e-5, "epochs": 2.0, "max_steps": -1,
        "batch_size": 8, "effective_batch_size": 64, "warmup_steps": 100, "max_length": 1024, "train_last_layers": 3,
        "train_lm_head": True,
    },
}


class HealConfig(StrictConfig):
    preset: str | None = Field(None, description="Named recipe whose settings fill what is not given: paper.")
    method: str = Field("distill", description="Healing method: partial | lora | qlora | full | cpt | distill | replace "
                        "| block-local.")
    # data
    data: str | None = Field(
        None, description="Training data: dolly | a Dolly/Alpaca .json/.jsonl file | a hub dataset id; cpt: c4 | a "
        "text file (never the wikitext2/ptb/c4-heldout/dolly-heldout test sets); a mix: c4:3+dolly:1 (each source as "
        "its kind, interleaved in proportion). Default: dolly, or c4 for cpt and distill.")
    max_samples: int | None = Field(None, ge=1, description="Use at most N examples.")
    template: Literal["auto", "chat", "alpaca"] = Field(
        "auto", description="Prompt format: auto (the chat template if the tokenizer has one) | chat | alpaca.")
    fields: str | None = Field(
        None, description="Field mapping for other formats, e.g. instruction=question,context=,response=answer.")
    # optimisation
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate (AdamW).")
    epochs: float = Field(1.0, gt=0, description="Passes over the data (ignored when max_steps is set).")
    max_steps: int = Field(150, description="Stop after this many optimizer steps (-1: use epochs).")
    max_minutes: float | None = Field(
        None, gt=0, le=MAX_MINUTES, description="Time budget of the healing stage (teacher pass + steps) on this machine: one timed "
        "step fits the number of steps into it, so the schedule completes; it never runs more than max_steps.")
    batch_size: int = Field(4, ge=1, description="Micro-batch per device.")
    effective_batch_size: int | None = Field(
        None, ge=1, description="Examples per optimizer step, via gradient accumulation (default: the micro-batch).")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    scheduler: str = Field("linear", description="Learning-rate schedule (a transformers scheduler type).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the gradient to this norm (0: no clipping).")
    max_length: int = Field(256, ge=8, description="Tokens per example; longer ones are cut.")
    packing: bool = Field(False, description="Pack several examples into one sequence.")
    responses: Literal["data", "teacher"] = Field(
        "data", description="Instruction data: train on the data set's responses (data) or on the teacher's own "
        "greedy responses to the same prompts (teacher: sequence-level distillation; generated once for the rows "
        "the steps read, cached on disk, inside the max_minutes budget).")
    response_tokens: int = Field(128, ge=1, description="responses teacher: most tokens of each teacher response.")
    # partial-layer fine-tuning
    train_last_layers: int = Field(3, ge=0, description="partial: train the last K remaining layers.")
    train_layers: list[int] | None = Field(None, description="partial: ORIGINAL indices of the layers to train.")
    train_lm_head: bool = Field(True, description="partial: also train lm_head (unties tied embeddings).")
    # LoRA / QLoRA
    lora_r: int = Field(8, ge=1, description="LoRA rank.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    lora_target: list[str] | Literal["all-linear"] = Field("all-linear", description="Module names, or all-linear.")
    init: Literal["none", "replace"] = Field(
        "none", description="Start from a training-free linear replacement of each cut (method replace) before "
        "training.")
    adapter: Literal["auto", "none", "lora"] = Field(
        "auto", description="full / cpt / distill: train every weight (none) or a LoRA adapter merged at the end "
        "(lora: tied embeddings stay tied); auto: every weight where AdamW's states fit this machine's memory, else "
        "LoRA (the memory plan of `layerprune plan`).")
    freeze: Literal["none", "embeddings", "prefix"] = Field(
        "none", description="full / cpt / distill with every weight training: also keep frozen the embeddings (and a "
        "tied lm_head) | prefix: the embeddings and the layers before the first cut but the last of them (they "
        "compute what the unpruned model does; the backward pass then stops at the cut).")
    # distillation, replacement, block-local healing
    teacher: str | None = Field(None, description="distill / replace / block-local: the unpruned model (default: the "
                                "model it was pruned from).")
    distill_temperature: float = Field(1.0, gt=0, description="distill: softmax temperature.")
    distill_alpha: float = Field(0.5, ge=0, le=1, description="distill: weight of the KL term; 1 - alpha weighs the "
                                 "cross-entropy on the text itself.")
    distill_top_k: int | None = Field(
        64, ge=1, description="distill: keep the teacher's top-k logits per token, computed once and cached on disk "
        "(none: the full distribution, recomputed every step).")
    distill_hidden: float = Field(
        1.0, ge=0, description="distill: weight of a loss on the hidden states at the cuts (the student's output "
        "of the kept layer before a cut toward the teacher's state after it, relative squared error; as Minitron, "
        "arXiv 2408.11796); 0: off. Applies with distill_top_k (the states are cached with the teacher's logits) "
        "and a teacher in memory.")
    local_layers: int = Field(1, ge=1, description="block-local: kept layers before each cut that are trained.")
    loss_chunk: int = Field(1024, ge=1, description="Positions whose logits are computed at once (memory bound).")
    # runtime
    train_dtype: Literal["fp32", "auto"] = Field(
        "fp32", description="Weights while training: fp32 master weights (compute still uses `bf16`'s autocast) | auto "
        "(the checkpoint's dtype). LoRA's frozen base is held in the checkpoint's 16-bit dtype where healing computes "
        "in it natively, whichever is set.")
    bf16: bool | Literal["auto"] = Field(
        "auto", description="bf16 autocast. auto: where the hardware computes bf16 natively (a GPU with bf16, a CPU "
        "with AVX512-BF16 or AMX), else fp32 on a CPU (emulated bf16 is many times slower) and fp16 on a GPU.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    seed: int = Field(0, description="Seed of data order, dropout and adapter initialisation.")
    logging_steps: int = Field(1, ge=1, description="Log the loss every N steps.")
    save_steps: int | None = Field(None, ge=1, description="Save a checkpoint every N steps (for resuming).")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        return apply_preset(data, HEAL_PRESETS)

    @field_validator("method")
    @classmethod
    def _registered_method(cls, value: str) -> str:
        # start-up: the method registry loads torch, and every command's options are built from this config
        from layerprune.finetune.methods import get_method

        try:
            get_method(value)
        except LayerpruneError as err:
            raise ValueError(str(err)) from None
        return value

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        from transformers import SchedulerType

        known = [s.value for s in SchedulerType]
        if value not in known:
            raise ValueError(f"unknown scheduler {value!r}; choose one of {', '.join(known)}")
        return value

    @field_validator("fields")
    @classmethod
    def _readable_fields(cls, value):
        if value is not None:
            try:
                FieldMap.parse(value)
            except LayerpruneError as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _check(self) -> "HealConfig":
        if self.effective_batch_size is not None and self.effective_batch_size < self.batch_size:
            raise ValueError("effective_batch_size must be >= batch_size")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError("max_steps must be -1 (use epochs) or >= 1")
        if "distill_hidden" in self.model_fields_set and self.distill_hidden and not self._hidden_applies():
            raise ValueError("distill_hidden needs method distill with distill_top_k (the teacher's states are cached "
                             "with its top-k logits)")
        if self.freeze != "none" and (self.method not in ("full", "cpt", "distill") or self.adapter == "lora"):
            raise ValueError("freeze applies to full / cpt / distill training every weight (not adapter lora)")
        if "response_tokens" in self.model_fields_set and self.responses != "teacher":
            raise ValueError("response_tokens needs responses: teacher")
        return self

    def _hidden_applies(self) -> bool:
        return self.method == "distill" and self.distill_top_k is not None

    @property
    def hidden_weight(self) -> float:
        """The weight of the hidden-state loss this config trains with (0 where it does not apply)."""
        return self.distill_hidden if self._hidden_applies() else 0.0

    def field_map(self):
        """The parsed `fields` mapping (None: the format is detected)."""
        return FieldMap.parse(self.fields) if self.fields else None
