"""How a decoder layer is called and what it returns, across transformers families (hooks read these)."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def hidden_of(out) -> torch.Tensor:
    """A decoder layer's output hidden states (transformers 5 layers return a tensor or a tuple)."""
    return out[0] if isinstance(out, tuple) else out


def layer_input(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def last_logits_kwargs(model) -> dict:
    """Ask for the last position's logits only, when the model allows it (saves the [B, L, V] logits)."""
    params = inspect.signature(model.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def call_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Run a decoder layer on `hidden` with the other arguments the model passed it."""
    if args:
        return hidden_of(layer(hidden, *args[1:], **kwargs))
    return hidden_of(layer(**{**kwargs, "hidden_states": hidden}))
