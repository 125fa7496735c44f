"""Every way layerprune runs a model as if some of its blocks were gone, without copying or cutting it.

- `bypass_layers`: blocks pass their input through (SLEB's `turn_off`): the reference surgery is tested
  against, and a cheap way to try a candidate;
- `StandIn` + `swapped`: a block's place taken by a pass-through or by a cached hidden state, so a
  drop-set's loss resumes from the deepest state it shares with an earlier pass (the perplexity metric,
  selection/drop_set_losses.py).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn

from layerprune.models.anatomy import Anatomy, get_anatomy
from layerprune.models.decoder_calls import layer_input


@contextlib.contextmanager
def bypass_layers(model: nn.Module, positions: Iterable[int]) -> Iterator[None]:
    """Make the blocks at these positions pass their input through unchanged (SLEB's `turn_off`).

    The model's structure is untouched, so this is a reference for surgery and a cheap
    way to try a candidate. Use with use_cache=False: bypassed blocks write no cache.
    """
    anatomy = get_anatomy(model)
    handles = []

    def passthrough(module, args, kwargs, output):
        hidden = layer_input(args, kwargs)
        if isinstance(output, tuple):
            return (hidden,) + tuple(output[1:])
        return hidden

    try:
        for pos in positions:
            handles.append(anatomy.layers[pos].register_forward_hook(passthrough, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


class StandIn(nn.Module):
    """Takes a block's place without computing it.

    With `value` None it passes its input hidden states through (the block is removed);
    otherwise it returns `value` (a cached hidden state) and ignores its input. `tail` is
    None for blocks that return a tensor, else the rest of the tuple the block returned.
    Other attributes are read from the original `block` (some model forwards read e.g.
    `layer.attention_type`); it is not registered as a submodule, so it is never run.
    """

    def __init__(self, tail: tuple | None, value: torch.Tensor | None = None, block: nn.Module | None = None) -> None:
        super().__init__()
        self.tail = tail
        self.value = value
        object.__setattr__(self, "_block", block)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block")
            if block is None:
                raise
            return getattr(block, name)

    def forward(self, *args, **kwargs):
        hidden = layer_input(args, kwargs)
        if self.value is not None:
            # The cache belongs to one chunk of samples; a different batch must never get it.
            if self.value.shape != hidden.shape:
                raise RuntimeError(f"cached hidden states {tuple(self.value.shape)} do not match {tuple(hidden.shape)}")
            hidden = self.value.to(hidden.device, non_blocking=True)
        return hidden if self.tail is None else (hidden,) + self.tail


@contextlib.contextmanager
def swapped(anatomy: Anatomy, replacements: dict[int, nn.Module]) -> Iterator[None]:
    """Run with some blocks replaced, through a new ModuleList; the original list object comes back."""
    original = anatomy.layers
    anatomy.set_layers(nn.ModuleList([replacements.get(p, block) for p, block in enumerate(original)]))
    try:
        yield
    finally:
        anatomy.set_layers(original)
