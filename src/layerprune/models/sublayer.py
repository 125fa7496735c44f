"""Remove only the attention or only the MLP of chosen decoder layers (module-level depth pruning).

Shortened LLaMA (arXiv 2402.02834, sec. 5.4.2) compares removing whole blocks with removing
individual MHA and FFN modules. Here a removed branch is replaced by a parameter-free stand-in that
returns zeros, so the block's residual stream passes that branch unchanged; the norms that serve only
that branch (anatomy: `attention_norms` / `mlp_norms`) become `nn.Identity`, so their weights and
compute go too. A norm applied to the zero output (Gemma's post-norms) would return zeros anyway.

A removed attention never touches the KV cache: on its first forward with a cache it turns its slot
into transformers' `DummyLayer`, which stores nothing and which `get_seq_length` and the mask code
skip, so the cache holds no keys or values for that layer and positions come from a live layer.

Indices are ORIGINAL layer indices, as everywhere; `config.layerprune["removed_sublayers"]` records
{"attention": [...], "mlp": [...]}.

Saving: stock transformers has no way to describe a layer without attention (or without MLP); its
`from_pretrained` would silently give such a layer freshly initialised random weights. So these models
are saved in a form that only layerprune reloads (`load_model`), and every stock loader fails loudly:
- the weights go to `layerprune-weights.safetensors`, a name `from_pretrained` does not look for (it
  raises "no file named model.safetensors"), and which does not match `model*.safetensors`;
- `config.json` keeps its `model_type` (layerprune rebuilds the stock model class from it) but
  `architectures` is `["LayerpruneSublayerModel"]`, which vLLM, llama.cpp's converter and other
  serving stacks reject as an unknown architecture;
- a README.md in the folder says so in words.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.files.outputs import read_json
from layerprune.models.anatomy import FamilySpec, family_spec, get_anatomy, model_dtype, supported_model_types
from layerprune.models.dtypes import parse_dtype, stored_dtype
from layerprune.models.model_config import read_model_config, trusts_remote_code
from layerprune.models.surgery import check_layer_indices, provenance, remove_layers

KINDS = ("attention", "mlp")
GRANULARITIES = ("block", *KINDS)
RECORD_KEY = "removed_sublayers"
WEIGHTS_NAME = "layerprune-weights.safetensors"
ARCHITECTURE_MARKER = "LayerpruneSublayerModel"


# ---------------------------------------------------------------------------------------------
# Stand-ins for a removed branch
# ---------------------------------------------------------------------------------------------


class AttentionSkipped(nn.Module):
    """A removed attention: adds nothing to the residual stream and stores nothing in the KV cache."""

    def __init__(self, layer_idx: int | None):
        super().__init__()
        self.layer_idx = layer_idx  # renumbered by surgery like any attention's, names the cache slot

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        cache = kwargs.get("past_key_values", kwargs.get("past_key_value"))
        if cache is not None:
            release_cache_slot(cache, self.layer_idx)
        return torch.zeros_like(hidden_states), None

    def extra_repr(self) -> str:
        return f"layer_idx={self.layer_idx}"


class MLPSkipped(nn.Module):
    """A removed MLP (dense or mixture of experts): adds nothing to the residual stream."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return torch.zeros_like(hidden_states)


def release_cache_slot(cache, layer_idx: int | None) -> None:
    """Make the cache slot of a layer without attention a `DummyLayer` (no keys, no values, skipped by
    `get_seq_length` and mask sizing). Works for caches built from the config and for lazy ones."""
    from transformers.cache_utils import DummyLayer

    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list) or layer_idx is None:
        return
    if layer_idx < len(layers):
        if not isinstance(layers[layer_idx], DummyLayer):
            layers[layer_idx] = DummyLayer()
        return
    replicate = getattr(cache, "layer_class_to_replicate", None)
    if replicate is None:
        return
    while len(layers) < layer_idx:
        layers.append(replicate())
    layers.append(DummyLayer())


# ---------------------------------------------------------------------------------------------
# Records (pure, on the config's `layerprune` dict)
# ---------------------------------------------------------------------------------------------


def removed_sublayers(record_or_model) -> dict[str, list[int]]:
    """{"attention": [...], "mlp": [...]} ORIGINAL indices whose branch is gone (empty lists if none)."""
    record = record_or_model if isinstance(record_or_model, dict) else provenance(record_or_model)
    found = record.get(RECORD_KEY) or {}
    return {kind: sorted(found.get(kind, [])) for kind in KINDS}


def has_removed_sublayers(config) -> bool:
    """Whether a config (object or config.json dict) records attention-only/MLP-only removals."""
    record = config.get("layerprune") if isinstance(config, dict) else getattr(config, "layerprune", None)
    if not isinstance(record, dict):
        return False
    found = record.get(RECORD_KEY) or {}
    return isinstance(found, dict) and any(found.get(kind) for kind in KINDS)


def removable_layers(record: dict, kind: str) -> list[int]:
    """ORIGINAL indices whose `kind` branch can still go: present, and the other branch still there
    (a block with neither branch is a whole-layer removal, see `remove_layers`)."""
    _check_kind(kind)
    gone = removed_sublayers(record)
    other = "mlp" if kind == "attention" else "attention"
    return [i for i in record["kept_layers"] if i not in gone[kind] and i not in gone[other]]


def check_sublayers(record: dict, kind: str, layers: Iterable[int]) -> list[int]:
    """Check ORIGINAL indices whose `kind` branch is to be removed; returns them sorted. Raises LayerpruneError."""
    _check_kind(kind)
    layers = list(layers)
    if not layers:
        raise LayerpruneError(f"no layers given whose {_label(kind)} to remove")
    check_layer_indices(record, layers)
    gone = removed_sublayers(record)
    other = "mlp" if kind == "attention" else "attention"
    for i in layers:
        if i in gone[kind]:
            raise LayerpruneError(f"the {_label(kind)} of layer {i} was already removed")
        if i in gone[other]:
            raise LayerpruneError(
                f"layer {i} has no {_label(other)} left, so removing its {_label(kind)} would empty it: "
                "remove the whole layer instead (granularity block)"
            )
    if kind == "attention":
        with_attention = [i for i in record["kept_layers"] if i not in gone["attention"]]
        if len(layers) >= len(with_attention):
            raise LayerpruneError(
                f"cannot remove all {len(with_attention)} remaining attentions; at least one must stay "
                "(the KV cache and the positions of generated tokens come from one)"
            )
    return sorted(layers)


def sublayer_provenance(record: dict, kind: str, layers: list[int], how: dict | None = None) -> dict:
    """The record after removing the `kind` branch of these (checked) ORIGINAL layers."""
    gone = removed_sublayers(record)
    gone[kind] = sorted(set(gone[kind]) | set(layers))
    history = list(record.get("history", []))
    history.append({f"removed_{kind}": list(layers), **(how or {})})
    return {**record, RECORD_KEY: gone, "history": history}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise LayerpruneError(f"unknown sub-layer {kind!r}; choose one of {', '.join(KINDS)}")


def _label(kind: str) -> str:
    return "attention" if kind == "attention" else "MLP"


# ---------------------------------------------------------------------------------------------
# Surgery
# ---------------------------------------------------------------------------------------------


def branch_spec(model: nn.Module) -> FamilySpec:
    """The family spec of a model whose blocks can lose one branch; one clear error otherwise."""
    anatomy = get_anatomy(model)
    spec = anatomy.spec
    if spec is None or spec.attention_norms is None or spec.mlp_norms is None:
        supported = sorted(
            t for t in supported_model_types() if (s := _spec_of(t)) is not None and s.attention_norms is not None
        )
        raise LayerpruneError(
            f"attention-only/MLP-only removal is not supported for {anatomy.family!r} "
            f"({type(model).__name__}): it needs blocks made of two sequential pre-norm residual branches "
            f"(model types: {', '.join(supported)}); remove whole layers instead"
        )
    return spec


def _spec_of(model_type: str):
    return family_spec(model_type)


def remove_attention(model: nn.Module, layers: Iterable[int], *, how: dict | None = None) -> nn.Module:
    """Remove the attention of the layers with these ORIGINAL indices, in place; returns the model."""
    return remove_sublayers(model, "attention", layers, how=how)


def remove_mlp(model: nn.Module, layers: Iterable[int], *, how: dict | None = None) -> nn.Module:
    """Remove the MLP (dense or experts) of the layers with these ORIGINAL indices, in place; returns the model."""
    return remove_sublayers(model, "mlp", layers, how=how)


def remove_sublayers(model: nn.Module, kind: str, layers: Iterable[int], *, how: dict | None = None) -> nn.Module:
    """Replace the `kind` branch ("attention" | "mlp") of these ORIGINAL layers by a zero stand-in.

    Checks everything before changing anything. `how` is stored in the record's history.
    """
    spec = branch_spec(model)
    record = provenance(model)
    layers = check_sublayers(record, kind, layers)
    blocks = get_anatomy(model).layers
    for i in layers:
        _replace_branch(blocks[record["kept_layers"].index(i)], spec, kind)
    model.config.layerprune = sublayer_provenance(record, kind, layers, how)
    return model


def remove_units(model: nn.Module, layers: Iterable[int], granularity: str = "block", *, how: dict | None = None):
    """Remove whole layers (granularity "block"), or only their attention or MLP; ORIGINAL indices."""
    if granularity not in GRANULARITIES:
        raise LayerpruneError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")
    if granularity == "block":
        return remove_layers(model, layers, how=how)
    return remove_sublayers(model, granularity, layers, how=how)


def restore_sublayers(model: nn.Module) -> nn.Module:
    """Give a freshly built model the stand-ins its config records (loading a saved model)."""
    record = provenance(model)
    gone = removed_sublayers(record)
    if not any(gone.values()):
        return model
    spec = branch_spec(model)
    blocks = get_anatomy(model).layers
    for kind, layers in gone.items():
        for i in layers:
            if i not in record["kept_layers"]:
                raise LayerpruneError(f"the config records a removed {_label(kind)} in layer {i}, which is not kept")
            _replace_branch(blocks[record["kept_layers"].index(i)], spec, kind)
    return model


def _replace_branch(block: nn.Module, spec: FamilySpec, kind: str) -> None:
    if kind == "attention":
        old = getattr(block, spec.attention)
        setattr(block, spec.attention, AttentionSkipped(getattr(old, "layer_idx", None)))
        norms = spec.attention_norms
    else:
        setattr(block, spec.mlp, MLPSkipped())
        norms = spec.mlp_norms
    for name in norms:
        setattr(block, name, nn.Identity())


# ---------------------------------------------------------------------------------------------
# Saving and loading (layerprune only)
# ---------------------------------------------------------------------------------------------

_FOLDER_README = """# A layerprune model with attention-only / MLP-only removals

Some decoder layers of this model have no attention or no MLP ({summary}; original layer indices).
Stock transformers, vLLM and llama.cpp cannot describe such layers, so the weights are stored in
`{weights}` and `config.json` names the architecture `{marker}`: stock loaders fail on purpose
rather than filling the missing modules with random weights.

Load it with layerprune only:

```python
from layerprune import load_model
loaded = load_model("path/to/this/folder")
```
"""


def write_sublayer_model(model: nn.Module, folder: str | os.PathLike) -> None:
    """Write config, generation config and weights of a model with removed branches into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    config = copy.deepcopy(model.config)
    config.architectures = [ARCHITECTURE_MARKER]
    config.dtype = model_dtype(model)
    config.save_pretrained(folder)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(folder)
    # A tied weight is stored once, under its first name (the embedding); loading ties it again.
    first_names = dict(model.named_parameters())
    shared = {name for name, _ in model.named_parameters(remove_duplicate=False)} - set(first_names)
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items() if name not in shared}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt", "layerprune": "sublayer"})
    gone = removed_sublayers(model)
    summary = "; ".join(f"{_label(kind)} removed in layers {layers}" for kind, layers in gone.items() if layers)
    (folder / "README.md").write_text(
        _FOLDER_README.format(summary=summary, weights=WEIGHTS_NAME, marker=ARCHITECTURE_MARKER)
    )


def is_sublayer_folder(folder: str | os.PathLike) -> bool:
    """Whether a local folder holds a model saved by `write_sublayer_model`."""
    path = Path(folder)
    if (path / WEIGHTS_NAME).is_file():
        return True
    try:
        config = read_json(path / "config.json")
    except LayerpruneError:
        return False
    return isinstance(config, dict) and has_removed_sublayers(config)


def load_sublayer_model(folder: str | os.PathLike, *, dtype="auto", device_map=None) -> nn.Module:
    """Rebuild the stock model class from the config, put the stand-ins in, load the weights strictly."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    config = read_model_config(folder)
    weights = folder / WEIGHTS_NAME
    if not has_removed_sublayers(config) or not weights.is_file():
        raise LayerpruneError(
            f"{folder} is an incomplete layerprune sub-layer model: it needs both {WEIGHTS_NAME} and the "
            "config's layerprune.removed_sublayers record"
        )
    dtype = parse_dtype(dtype)
    if dtype == "auto":
        dtype = stored_dtype(config) or torch.float32
    with init_empty_weights():  # parameters on the meta device, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trusts_remote_code())
    restore_sublayers(model)
    state = load_file(str(weights))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise LayerpruneError(f"{weights} holds tensors this model does not have: {', '.join(unexpected[:5])}")
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = sorted(name for name, p in model.named_parameters() if p.is_meta)
    if missing:
        raise LayerpruneError(f"{weights} lacks weights of this model: {', '.join(missing[:5])}")
    config.architectures = [type(model).__name__]
    if device_map is not None:
        from accelerate import dispatch_model, infer_auto_device_map

        if device_map == "auto":
            device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules, dtype=dtype)
        model = dispatch_model(model, device_map=device_map)
        model.hf_device_map = device_map
    return model
