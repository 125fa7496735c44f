"""Where things live inside each architecture family.

This is the only module that knows architecture facts. Every family is one
`FamilySpec` registered under the `model_type` values it covers; models of an
unregistered type fall back to a generic discovery of the decoder's block list
that only succeeds when it is unambiguous.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from layerprune.common.registry import Registry
from layerprune.errors import LayerpruneError
from layerprune.models.quantize import logical_numel as numel
from layerprune.models.quantize import stored_bytes

# A config rewrite: (config, kept positions of the current model) -> None, in place.
ConfigRewrite = Callable[[object, list[int]], None]


@dataclass(frozen=True)
class FamilySpec:
    """Paths (dotted attribute names from the *ForCausalLM module) of one family."""

    name: str
    layers: str
    # Config attributes whose value is a list with one entry per layer.
    per_layer_lists: tuple[str, ...] = ("layer_types",)
    # Extra rewrites for configs that encode per-layer structure otherwise.
    config_rewrites: tuple[ConfigRewrite, ...] = ()
    # Sub-module names inside one block (attention-only / MLP-only removal, models/sublayer.py).
    attention: str = "self_attn"
    mlp: str = "mlp"
    # The norms that serve only the attention / only the MLP branch, pre-norm first (the MLP's pre-norm
    # receives the residual stream between the two branches). None: a block of this family cannot lose
    # one branch alone (its branches are not two sequential pre-norm residual branches).
    attention_norms: tuple[str, ...] | None = None
    mlp_norms: tuple[str, ...] | None = None


_FAMILIES: Registry[FamilySpec] = Registry("model_type")


def register_family(spec: FamilySpec, model_types: list[str]) -> FamilySpec:
    for model_type in model_types:
        _FAMILIES.add(model_type, spec)
    return spec


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def family_spec(model_type: str | None) -> FamilySpec | None:
    """The registered spec of a model_type, or None (only a loaded model can then be discovered)."""
    return _FAMILIES.get(model_type)


def _remap_window_threshold(config, kept: list[int]) -> None:
    """Qwen2/Qwen3: layers >= max_window_layers may use sliding windows.

    layer_types (trimmed) is what the model reads; the threshold is rewritten so
    the config stays self-consistent if someone regenerates layer_types from it.
    """
    threshold = getattr(config, "max_window_layers", None)
    if isinstance(threshold, int):
        config.max_window_layers = sum(1 for i in kept if i < threshold)


def _remap_moe_layout(config, kept: list[int]) -> None:
    """Qwen-MoE: whether block i is sparse is computed from i, so renumbering would change the structure.

    Record the kept blocks' kind explicitly: every block sparse, except those listed in mlp_only_layers.
    """
    step = getattr(config, "decoder_sparse_step", 1) or 1
    dense_before = set(getattr(config, "mlp_only_layers", []) or [])
    n_experts = getattr(config, "num_experts", 0) or 0

    def is_sparse(i: int) -> bool:
        return i not in dense_before and n_experts > 0 and (i + 1) % step == 0

    config.decoder_sparse_step = 1
    config.mlp_only_layers = [new for new, old in enumerate(kept) if not is_sparse(old)]


def _remap_first_dense(config, kept: list[int]) -> None:
    """DeepSeek: the first `first_k_dense_replace` blocks are dense, the rest MoE. Kept blocks stay in order, so
    the kept dense ones are still a prefix: the count of kept blocks below the old threshold."""
    threshold = getattr(config, "first_k_dense_replace", None)
    if isinstance(threshold, int):
        config.first_k_dense_replace = sum(1 for i in kept if i < threshold)


_LLAMA_LIKE = dict(layers="model.layers")
# Llama's `post_attention_layernorm` is the MLP's pre-norm; Gemma 2/3 also norm each branch's output.
_LLAMA_BRANCHES = dict(attention_norms=("input_layernorm",), mlp_norms=("post_attention_layernorm",))
_GEMMA_BRANCHES = dict(
    attention_norms=("input_layernorm", "post_attention_layernorm"),
    mlp_norms=("pre_feedforward_layernorm", "post_feedforward_layernorm"),
)

register_family(FamilySpec("llama", **_LLAMA_LIKE, **_LLAMA_BRANCHES), ["llama"])
register_family(FamilySpec("mistral", **_LLAMA_LIKE, **_LLAMA_BRANCHES), ["mistral"])
register_family(
    FamilySpec("qwen2", **_LLAMA_LIKE, **_LLAMA_BRANCHES, config_rewrites=(_remap_window_threshold,)), ["qwen2"]
)
register_family(
    FamilySpec("qwen3", **_LLAMA_LIKE, **_LLAMA_BRANCHES, config_rewrites=(_remap_window_threshold,)), ["qwen3"]
)
register_family(FamilySpec("gemma2", **_LLAMA_LIKE, **_GEMMA_BRANCHES), ["gemma2"])
register_family(FamilySpec("gemma3", **_LLAMA_LIKE, **_GEMMA_BRANCHES), ["gemma3_text"])
register_family(FamilySpec("phi3", **_LLAMA_LIKE, **_LLAMA_BRANCHES), ["phi3"])
register_family(FamilySpec("mixtral", **_LLAMA_LIKE, **_LLAMA_BRANCHES, mlp="mlp"), ["mixtral"])
register_family(
    FamilySpec(
        "qwen-moe", **_LLAMA_LIKE, **_LLAMA_BRANCHES, config_rewrites=(_remap_window_threshold, _remap_moe_layout)
    ),
    ["qwen2_moe", "qwen3_moe"],
)
register_family(FamilySpec("deepseek", **_LLAMA_LIKE, config_rewrites=(_remap_first_dense,)),
                ["deepseek_v2", "deepseek_v3"])
# Mixture-of-experts families whose layer list is plain (GPT-OSS's layer_types are trimmed like every family's).
register_family(FamilySpec("olmoe", **_LLAMA_LIKE), ["olmoe"])
register_family(FamilySpec("gpt-oss", **_LLAMA_LIKE), ["gpt_oss"])
register_family(FamilySpec("granite-moe", **_LLAMA_LIKE), ["granitemoe"])
register_family(FamilySpec("gpt2", layers="transformer.h", attention="attn"), ["gpt2"])
register_family(FamilySpec("gpt-neox", layers="gpt_neox.layers", attention="attention"), ["gpt_neox"])
register_family(FamilySpec("opt", layers="model.decoder.layers", mlp="fc1"), ["opt"])


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@dataclass
class Anatomy:
    """A model's parts, found through its family spec (or by discovery)."""

    model: nn.Module
    family: str
    layers_path: str
    spec: FamilySpec | None = field(default=None, repr=False)

    @property
    def text_config(self):
        """The config that holds the decoder's hyper-parameters (nested for multimodal models)."""
        return self.model.config.get_text_config()

    @property
    def layers(self) -> nn.ModuleList:
        return _get_path(self.model, self.layers_path)

    def set_layers(self, layers: nn.ModuleList) -> None:
        parent_path, _, attr = self.layers_path.rpartition(".")
        parent = _get_path(self.model, parent_path) if parent_path else self.model
        setattr(parent, attr, layers)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Module | None:
        return self.model.get_output_embeddings()

    @property
    def tied_embeddings(self) -> bool:
        head = self.lm_head
        return head is not None and head.weight is self.embeddings.weight


def get_anatomy(model: nn.Module) -> Anatomy:
    """The anatomy of a loaded causal LM; raises LayerpruneError when the layout can't be known."""
    model_type = getattr(model.config, "model_type", None)
    spec = _FAMILIES.get(model_type)
    if spec is not None:
        if not isinstance(_get_path(model, spec.layers), nn.ModuleList):
            raise LayerpruneError(
                f"{type(model).__name__} (model_type {model_type!r}) has no decoder layer list at "
                f"'{spec.layers}'; load it with AutoModelForCausalLM"
            )
        return Anatomy(model, spec.name, spec.layers, spec)
    return _discover(model, model_type)


def _discover(model: nn.Module, model_type: str | None) -> Anatomy:
    """Generic fallback: the one ModuleList of identical blocks with num_hidden_layers entries."""
    n = getattr(model.config.get_text_config(), "num_hidden_layers", None)
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList)
        and len(module) > 0
        and (n is None or len(module) == n)
        and len({type(block) for block in module}) == 1
        and any(p.ndim >= 2 for p in module[0].parameters())
    ]
    if len(candidates) != 1:
        found = ", ".join(candidates) if candidates else "none"
        raise LayerpruneError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}): could not find its decoder "
            f"layers unambiguously (candidates: {found}). Supported model types: {', '.join(supported_model_types())}"
        )
    return Anatomy(model, f"generic:{model_type}", candidates[0], None)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Unique parameters (tied weights counted once), split into embedding and the rest.

    Packed 4-bit weights (bitsandbytes) count the parameters they stand for, not their bytes.
    """
    anatomy = get_anatomy(model)
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += numel(p)
    embedding_ids = {id(p) for p in anatomy.embeddings.parameters()}
    head = anatomy.lm_head
    if head is not None:
        embedding_ids |= {id(p) for p in head.parameters()}
    embedding = sum(numel(p) for p in model.parameters() if id(p) in embedding_ids)
    # Models with learned position embeddings (GPT-2, OPT) count those as embeddings too.
    for name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module is not anatomy.embeddings:
            embedding += sum(numel(p) for p in module.parameters() if id(p) not in embedding_ids)
    per_layer = [sum(numel(p) for p in block.parameters()) for block in anatomy.layers]
    return {"total": total, "embedding": embedding, "non_embedding": total - embedding, "per_layer": per_layer}


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the unique parameters as stored: packed quantized weights plus their scales."""
    seen: set[int] = set()
    size = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            size += stored_bytes(p)
    return size


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype
