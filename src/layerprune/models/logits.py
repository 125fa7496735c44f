"""A causal LM as decoder + head: the head's logits (soft-capped where the family does) at labelled positions."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from layerprune.models.tokens import IGNORE_INDEX


def unwrapped(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside DDP / FSDP-style (`.module`) and peft wrappers."""
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def causal_lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, float | None]:
    """(decoder, head, final logit soft-cap) of a causal LM, also inside DDP and peft wrappers."""
    lm = unwrapped(model)
    return lm.base_model, lm.get_output_embeddings(), getattr(lm.config, "final_logit_softcapping", None)


def head_logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:  # Gemma 2/3 bound their logits: tanh(x / cap) * cap
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def labelled_positions(model: nn.Module, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states that predict a label, those labels): next-token targets, padding and prompts left out.

    The forward goes through `model` itself (so DDP synchronises gradients and peft runs its adapters), asking
    for the last position's logits only; the decoder's output is taken by a hook."""
    lm = unwrapped(model)
    captured = {}

    def keep_hidden(module, args, output):  # returns None: the output goes on unchanged
        captured["hidden"] = output[0]

    hook = lm.base_model.register_forward_hook(keep_hidden)
    try:
        extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}
        model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra)
    finally:
        hook.remove()
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    return captured["hidden"][:, :-1][keep], targets[keep]
