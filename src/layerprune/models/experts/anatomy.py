"""Where the experts, the router and the expert count live, per mixture-of-experts family.

transformers (5.x) keeps a block's experts FUSED in memory: every tensor of the experts module has the expert
on its first axis (`gate_up_proj [E, ...]`, `down_proj [E, ...]`, GPT-OSS's `*_bias [E, ...]`), and the
router holds one row per expert (`weight [E, hidden]`, GPT-OSS's `bias [E]`, DeepSeek-V3's
`e_score_correction_bias [E]`). Every router returns (router_logits, top_k_weights, top_k_index).
The routing semantics of each family after removal are documented in routing.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from layerprune.common.registry import Registry
from layerprune.errors import LayerpruneError
from layerprune.models.anatomy import get_anatomy
from layerprune.models.surgery import kept_layers

# A check of a cut against the family's routing: (text config, experts kept per MoE layer as positions
# 0..E-1 of the current experts) -> None, or LayerpruneError.
RoutingCheck = Callable[[object, dict[int, list[int]]], None]


@dataclass(frozen=True)
class MoeSpec:
    """One family's mixture-of-experts facts: attribute names inside a decoder block and in its config."""

    name: str
    count_field: str  # the config field of the number of routed experts per MoE layer
    block: str = "mlp"  # the MoE block inside a decoder layer
    router: str = "gate"  # inside the block
    experts: str = "experts"  # inside the block; shared experts (`shared_expert(s)`) are other modules
    routing: str = ""  # what routing does after removal (documentation, shown by `info`)
    check_cut: RoutingCheck | None = None  # constraints of the routing (DeepSeek's expert groups)
    # Groups of consecutive experts a cut must thin evenly (group-limited routing): config -> count (1: none).
    groups: Callable[[object], int] | None = None


_MOE: Registry[MoeSpec] = Registry("mixture-of-experts model_type", ("layerprune.models.experts.routing",))


def register_moe_family(spec: MoeSpec, model_types: list[str]) -> MoeSpec:
    for model_type in model_types:
        _MOE.add(model_type, spec)
    return spec


def moe_model_types() -> list[str]:
    return _MOE.names()


@dataclass
class MoeLayer:
    """One decoder layer's MoE block: its position now, its ORIGINAL index, and the stock modules."""

    position: int
    original: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module

    @property
    def num_experts(self) -> int:
        return int(self.router.weight.shape[0])


def moe_spec(model: nn.Module) -> MoeSpec:
    """The family's MoE facts; one LayerpruneError for a dense or unsupported model."""
    return config_moe_spec(model.config)


def config_moe_spec(config) -> MoeSpec:
    """`moe_spec` from a config alone (checkpoints on disk)."""
    return model_type_moe_spec(getattr(config.get_text_config(), "model_type", None))


def model_type_moe_spec(model_type: str | None) -> MoeSpec:
    """`moe_spec` from a model_type alone (GGUF files)."""
    _MOE.load_builtins()
    spec = _MOE.get(model_type)
    if spec is None:
        raise LayerpruneError(
            f"model_type {model_type!r} is not a supported mixture-of-experts model, so it has no experts to "
            f"remove (supported: {', '.join(moe_model_types())})"
        )
    return spec


def moe_layers(model: nn.Module) -> list[MoeLayer]:
    """The decoder layers that hold a routed MoE block, in order (dense layers are left out)."""
    spec = moe_spec(model)
    originals = kept_layers(model)
    found = []
    for position, layer in enumerate(get_anatomy(model).layers):
        block = getattr(layer, spec.block, None)
        router = getattr(block, spec.router, None)
        experts = getattr(block, spec.experts, None)
        if isinstance(router, nn.Module) and isinstance(experts, nn.Module):
            found.append(MoeLayer(position, originals[position], block, router, experts))
    if not found:
        raise LayerpruneError(f"this {spec.name} model has no mixture-of-experts layers (every layer is dense)")
    return found


def expert_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameters and buffers (not its children's): each has the expert on axis 0."""
    tensors = {name: p for name, p in module.named_parameters(recurse=False)}
    tensors.update({name: b for name, b in module.named_buffers(recurse=False) if b is not None})
    return tensors


def expert_count(model: nn.Module) -> int:
    """The config's number of routed experts per MoE layer."""
    return int(getattr(model.config.get_text_config(), moe_spec(model).count_field))


def experts_per_layer(model: nn.Module) -> dict[int, int]:
    """ORIGINAL layer index -> number of experts its MoE block holds now."""
    return {layer.original: layer.num_experts for layer in moe_layers(model)}


def expert_groups(model: nn.Module) -> int:
    """How many runs of consecutive experts a cut must remove as many experts from (1: no constraint)."""
    spec = moe_spec(model)
    return spec.groups(model.config.get_text_config()) if spec.groups is not None else 1
