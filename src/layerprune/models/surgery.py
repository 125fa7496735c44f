"""Remove decoder layers so that the result is a plain, consistent transformers model.

Invariants kept by `remove_layers` (each one checked by a reload test):
- the block list is rebuilt, and `num_hidden_layers` equals its length;
- every config list with one entry per layer (`layer_types`, ...) is trimmed and
  family-specific index encodings are rewritten (see anatomy);
- every `layer_idx` inside a kept block is renumbered, or the KV cache breaks;
- `config.layerprune["kept_layers"]` records the ORIGINAL indices of the kept
  blocks, so a second prune still speaks original indices.
"""

from __future__ import annotations

from typing import Iterable

from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.models.anatomy import Anatomy, FamilySpec, get_anatomy


def provenance(model: nn.Module) -> dict:
    """The `layerprune` entry of the config: original layer count, kept and dropped original indices."""
    record = getattr(model.config, "layerprune", None)
    if isinstance(record, dict) and "kept_layers" in record:
        return record
    return config_provenance(model.config, get_anatomy(model).num_layers)


def config_provenance(config, num_layers: int) -> dict:
    """`provenance` from a config alone (checkpoints on disk): its record, or a fresh one for num_layers."""
    record = getattr(config, "layerprune", None)
    if isinstance(record, dict) and "kept_layers" in record:
        return record
    return {"original_num_layers": num_layers, "kept_layers": list(range(num_layers)), "dropped_layers": []}


def kept_layers(model: nn.Module) -> list[int]:
    """Original index of each current block, in order."""
    return list(provenance(model)["kept_layers"])


def validate_drop(model: nn.Module, drop: Iterable[int]) -> list[int]:
    """Check a list of ORIGINAL layer indices to drop; returns it sorted. Raises LayerpruneError."""
    return check_drop(provenance(model), drop)


def check_drop(record: dict, drop: Iterable[int]) -> list[int]:
    """`validate_drop` against a provenance record (see `config_provenance`)."""
    drop = check_layer_indices(record, drop)
    kept = record["kept_layers"]
    if len(drop) >= len(kept):
        raise LayerpruneError(f"cannot drop all {len(kept)} remaining layers; at least one must stay")
    return sorted(drop)


def check_layer_indices(record: dict, indices: Iterable[int]) -> list[int]:
    """ORIGINAL layer indices that are integers, unrepeated, in range and still kept in a provenance record,
    as a list in the given order. Raises LayerpruneError (whole layers and sub-layers alike)."""
    indices = list(indices)
    duplicates = sorted({i for i in indices if indices.count(i) > 1})
    if duplicates:
        raise LayerpruneError(f"duplicate layer indices: {duplicates}")
    original_n = record["original_num_layers"]
    kept = record["kept_layers"]
    for i in indices:
        if not isinstance(i, int) or isinstance(i, bool):
            raise LayerpruneError(f"layer indices must be integers, got {i!r}")
        if i < 0 or i >= original_n:
            raise LayerpruneError(
                f"layer index {i} is out of range: the original model has {original_n} layers (0..{original_n - 1})"
            )
        if i not in kept:
            raise LayerpruneError(f"layer {i} was already removed (remaining original layers: {kept})")
    return indices


def remove_layers(model: nn.Module, drop: Iterable[int], *, how: dict | None = None) -> nn.Module:
    """Remove the blocks with the given ORIGINAL indices, in place; returns the model.

    `how` (e.g. {"chosen_by": "block-influence", "num_layers": 8}) is stored in the provenance history.
    Works on models dispatched over several devices: the kept blocks stay where they are.
    """
    drop = validate_drop(model, drop)
    anatomy = get_anatomy(model)
    keep_positions, new_record = pruned_provenance(provenance(model), drop, how)

    # Modules share the config object, so rewriting it in place updates the live model too.
    rewrite_config(model.config, keep_positions, anatomy.spec)
    _rebuild_layer_list(anatomy, keep_positions)
    _remap_device_map(model, anatomy.layers_path, keep_positions)
    model.config.layerprune = new_record
    return model


def pruned_provenance(record: dict, drop: list[int], how: dict | None = None) -> tuple[list[int], dict]:
    """(positions of the current layers that stay, the record after dropping these ORIGINAL indices).

    `drop` must already be checked (`check_drop`). Pure: the checkpoint path uses it too.
    """
    kept_before = record["kept_layers"]
    keep_positions = [pos for pos, orig in enumerate(kept_before) if orig not in drop]
    history = list(record.get("history", []))
    history.append({"dropped": list(drop), **(how or {})})
    new_record = {
        "original_num_layers": record["original_num_layers"],
        "kept_layers": [kept_before[p] for p in keep_positions],
        "dropped_layers": sorted(set(record["dropped_layers"]) | set(drop)),
        "history": history,
    }
    for key in ("source", "trust_remote_code"):  # where the original came from, and how it was loaded
        if key in record:
            new_record[key] = record[key]
    # Attention-only/MLP-only removals (models/sublayer.py) of the layers that stay are still true.
    removed = {k: [i for i in v if i not in drop] for k, v in (record.get("removed_sublayers") or {}).items()}
    if any(removed.values()):
        new_record["removed_sublayers"] = removed
    # Experts removed from the layers that stay (models/experts/) are still true; keyed by ORIGINAL layer.
    experts = record.get("experts")
    if experts:
        new_record["experts"] = {
            key: ({layer: v for layer, v in value.items() if int(layer) not in drop} if isinstance(value, dict) else value)
            for key, value in experts.items()
        }
    return keep_positions, new_record


def _rebuild_layer_list(anatomy: Anatomy, keep_positions: list[int]) -> None:
    old = anatomy.layers
    new = nn.ModuleList([old[p] for p in keep_positions])
    for new_idx, block in enumerate(new):
        for module in block.modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = new_idx
    anatomy.set_layers(new)


def rewrite_config(config, keep_positions: list[int], spec: FamilySpec | None = None) -> None:
    """Make a config describe the model that keeps the layers at these positions, in place.

    Trims every per-layer list, applies the family's config rewrites (see anatomy) and sets
    `num_hidden_layers`; the text config of a nested (multimodal) config is rewritten too.
    Needs no model, so it serves in-memory surgery and checkpoint pruning alike. `spec` None
    (a generically discovered family) trims `layer_types` only. Raises before changing anything.
    """
    text_config = config.get_text_config()
    if getattr(text_config, "scale_attn_by_inverse_layer_idx", False):
        raise LayerpruneError(
            "this GPT-2 config scales attention by 1/layer_idx, so renumbered layers would compute differently; "
            "layer removal is not supported for scale_attn_by_inverse_layer_idx=True"
        )
    per_layer_lists = spec.per_layer_lists if spec else ("layer_types",)
    rewrites = spec.config_rewrites if spec else ()
    n_before = text_config.num_hidden_layers
    for cfg in {id(c): c for c in (config, text_config)}.values():
        for key in per_layer_lists:
            value = getattr(cfg, key, None)
            if isinstance(value, (list, tuple)) and len(value) == n_before:
                setattr(cfg, key, [value[p] for p in keep_positions])
        for rewrite in rewrites:
            if hasattr(cfg, "num_hidden_layers"):
                rewrite(cfg, keep_positions)
    text_config.num_hidden_layers = len(keep_positions)


def _remap_device_map(model: nn.Module, layers_path: str, keep_positions: list[int]) -> None:
    """accelerate's hf_device_map names blocks by position; keep it truthful after renumbering."""
    device_map = getattr(model, "hf_device_map", None)
    if not device_map:
        return
    prefix = layers_path + "."
    new_index = {old: new for new, old in enumerate(keep_positions)}
    remapped = {}
    for name, device in device_map.items():
        if name.startswith(prefix):
            index, _, rest = name[len(prefix):].partition(".")
            if index.isdigit():
                if int(index) not in new_index:
                    continue
                name = f"{prefix}{new_index[int(index)]}" + (f".{rest}" if rest else "")
        remapped[name] = device
    model.hf_device_map = remapped


def untie_embeddings(model: nn.Module) -> bool:
    """Give lm_head its own copy of the embedding matrix. Returns False if it was not tied.

    Needed before training lm_head alone: a tied head would also train the input
    embeddings, and backpropagation would then run through every layer.
    """
    anatomy = get_anatomy(model)
    head = anatomy.lm_head
    if head is None or not anatomy.tied_embeddings:
        return False
    head.weight = nn.Parameter(anatomy.embeddings.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    return True
