"""One calibration pass recording, per MoE layer and expert, what the stock router sends it.

A forward hook on each block's experts module (the stock module, whatever the family) receives exactly what
the router decided: the block's tokens [T, H], their top-k expert indices [T, k] and the weights the router
gives them [T, k] (the weights the experts' outputs are multiplied by: renormalised or not, sigmoid-based
times routed_scaling_factor for DeepSeek, per the family; models/experts/routing.py). Padding tokens are
dropped before anything is counted. With `outputs`, each expert's own output f_j(x) on the tokens routed to
it is computed by the same stock module (routing every such token to j alone with weight 1), so GPT-OSS's
biases and clamped SwiGLU are included. Sums are float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.importance.activations import calibration_forward
from layerprune.models.experts.anatomy import MoeLayer, moe_layers


@dataclass
class LayerRouting:
    """Sums over the real calibration tokens of one MoE layer (index j = the expert's current position)."""

    n_experts: int
    tokens: int = 0  # real tokens that reached the block
    count: torch.Tensor = field(default=None)  # [E] tokens routed to expert j
    weight_sum: torch.Tensor = field(default=None)  # [E] sum of the gate values g_j(x) of those tokens
    norm_sum: torch.Tensor = field(default=None)  # [E] sum of ||f_j(x)||_2 (with outputs)
    weighted_norm_sum: torch.Tensor = field(default=None)  # [E] sum of g_j(x) * ||f_j(x)||_2 (with outputs)

    def __post_init__(self) -> None:
        for name in ("count", "weight_sum", "norm_sum", "weighted_norm_sum"):
            setattr(self, name, torch.zeros(self.n_experts, dtype=torch.float64))

    def observe(self, experts: nn.Module, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor,
                real: torch.Tensor, outputs: bool) -> None:
        hidden, index, weights = hidden[real], index[real], weights[real].double()
        self.tokens += int(hidden.shape[0])
        flat_index = index.reshape(-1).cpu()
        self.count += torch.bincount(flat_index, minlength=self.n_experts)[: self.n_experts].double()
        self.weight_sum.index_add_(0, flat_index, weights.reshape(-1).cpu())
        if not outputs:
            return
        for j in flat_index.unique().tolist():
            rows, slots = (index == j).nonzero(as_tuple=True)
            ones_index = torch.full((rows.shape[0], 1), j, dtype=index.dtype, device=index.device)
            ones = torch.ones((rows.shape[0], 1), dtype=hidden.dtype, device=hidden.device)
            # forward(), not __call__: the hooks (this one included) must not see this extra call.
            norms = experts.forward(hidden[rows], ones_index, ones).double().norm(dim=-1)
            self.norm_sum[j] += norms.sum().cpu()
            self.weighted_norm_sum[j] += (norms * weights[rows, slots]).sum().cpu()


def watch_routing(layer: MoeLayer, stats: LayerRouting, state: dict, outputs: bool):
    """A forward hook on the layer's experts module adding each call to `stats`; state["mask"] holds the
    current batch's attention mask (its real tokens). Returns the hook's handle."""

    def hook(module, args, kwargs, out):
        hidden, index, weights = _experts_call(args, kwargs)
        real = state["mask"].reshape(-1).to(hidden.device).bool()
        if real.shape[0] != hidden.shape[0]:
            raise LayerpruneError(f"layer {layer.original}: {hidden.shape[0]} tokens reached the experts, "
                                  f"the batch has {real.shape[0]}")
        stats.observe(module, hidden, index, weights, real, outputs)

    return layer.experts.register_forward_hook(hook, with_kwargs=True)


def _experts_call(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden [T, H], top-k index [T, k], top-k weights [T, k]) of a stock experts call."""
    values = list(args) + list(kwargs.values())
    if len(values) < 3:
        raise LayerpruneError("an experts module was called without (hidden_states, top_k_index, top_k_weights)")
    return values[0], values[1], values[2]


def routing_pass(model, calibration, *, batch_size: int = 8, outputs: bool = True) -> dict[int, LayerRouting]:
    """{ORIGINAL layer: LayerRouting} over every real calibration token; the model is left as it was."""
    if batch_size < 1:
        raise LayerpruneError(f"batch_size must be >= 1, got {batch_size}")
    layers = moe_layers(model)
    stats = {layer.original: LayerRouting(layer.num_experts) for layer in layers}
    state = {"mask": None}
    handles = [watch_routing(layer, stats[layer.original], state, outputs) for layer in layers]

    def set_mask(mask):
        state["mask"] = mask

    calibration_forward(model, calibration, batch_size, handles, set_mask)
    return stats
