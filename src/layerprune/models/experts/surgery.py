"""Remove experts from MoE blocks so that the result is a plain, stock transformers model.

`remove_experts(model, {layer: [experts]})` speaks ORIGINAL indices (of layers and of experts), so a second
cut, or a cut after layer removal, names the same experts as the first. Invariants (each checked by a test):
- every tensor of a block's experts module and its router keeps only the kept experts' rows (axis 0), in
  their original order; shared experts and dense layers are untouched;
- the modules' `num_experts` and the config's expert count equal the number of experts left, the same in
  every MoE layer (the config holds one count), and at least `num_experts_per_tok`;
- the pruned model computes what the unpruned one computes with the removed experts' router logits at
  minus infinity (routing.py says what that means per family);
- `config.layerprune["experts"]` records the ORIGINAL indices kept and dropped per ORIGINAL layer.
Everything is checked before anything changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.models.experts.anatomy import MoeLayer, MoeSpec, expert_tensors, moe_layers, moe_spec
from layerprune.models.surgery import check_layer_indices, provenance

RECORD_KEY = "experts"


@dataclass
class ExpertCut:
    """A checked cut: per MoE layer, the positions of its current experts that stay; the record after it."""

    keep: dict[int, list[int]]  # ORIGINAL layer -> positions (among its current experts) that stay
    num_experts: int  # experts per MoE layer after the cut
    dropped: dict[int, list[int]]  # ORIGINAL layer -> the ORIGINAL experts this cut removes
    record: dict  # the `experts` record after the cut


def expert_record(model: nn.Module) -> dict:
    """`config.layerprune["experts"]`: original expert count, ORIGINAL expert indices kept / dropped per ORIGINAL
    layer (string keys, as JSON has them). A model never cut gets a fresh record."""
    originals = [layer.original for layer in moe_layers(model)]
    return config_expert_record(model.config, moe_spec(model), originals, provenance(model))


def config_expert_record(config, spec: MoeSpec, moe_originals: list[int], layer_record: dict) -> dict:
    """`expert_record` from a config alone (checkpoints on disk): its record, or a fresh one for these MoE layers."""
    record = layer_record.get(RECORD_KEY)
    if isinstance(record, dict) and "kept" in record:
        return record
    n = int(getattr(config.get_text_config(), spec.count_field))
    layers = [str(original) for original in moe_originals]
    return {"original_num_experts": n, "kept": {k: list(range(n)) for k in layers}, "dropped": {k: [] for k in layers}}


def plan_expert_cut(model: nn.Module, drop: Mapping[int, Iterable[int]]) -> ExpertCut:
    """Check a cut {ORIGINAL layer: [ORIGINAL experts]} against the model; raises LayerpruneError, changes nothing."""
    layers = moe_layers(model)
    record = expert_record(model)
    for layer in layers:
        _check_layout(layer, len(record["kept"][str(layer.original)]))
    return check_expert_cut(moe_spec(model), model.config.get_text_config(), provenance(model), record,
                            [layer.original for layer in layers], drop)


def check_expert_cut(spec: MoeSpec, config, layer_record: dict, record: dict, moe_originals: list[int],
                     drop: Mapping[int, Iterable[int]]) -> ExpertCut:
    """The checked cut, from records alone (in memory and on disk): `layer_record` the layer provenance, `record`
    the experts record, `moe_originals` the ORIGINAL indices of the MoE layers there are. Pure."""
    drop = _checked_layers(layer_record, drop, moe_originals)
    keep, dropped = {}, {}
    for original in moe_originals:
        kept_before = record["kept"][str(original)]
        gone = _checked_experts(original, drop.get(original, []), kept_before, record["original_num_experts"])
        keep[original] = [pos for pos, expert in enumerate(kept_before) if expert not in gone]
        dropped[original] = gone
    counts = {original: len(positions) for original, positions in keep.items()}
    if len(set(counts.values())) != 1:
        raise LayerpruneError(
            f"{spec.name} configs hold one expert count for every MoE layer, so every MoE layer must keep as many "
            f"experts; this cut would leave {_describe(counts)}"
        )
    n, top_k = next(iter(counts.values())), config.num_experts_per_tok
    if n < top_k:
        raise LayerpruneError(f"cannot keep {n} experts per layer: the router chooses num_experts_per_tok={top_k}")
    if spec.check_cut is not None:
        spec.check_cut(config, keep)
    new_record = {
        "original_num_experts": record["original_num_experts"],
        "kept": {str(o): [record["kept"][str(o)][p] for p in keep[o]] for o in moe_originals},
        "dropped": {str(o): sorted(set(record["dropped"].get(str(o), [])) | set(dropped[o])) for o in moe_originals},
    }
    return ExpertCut(keep, n, {o: d for o, d in dropped.items() if d}, new_record)


def remove_experts(model: nn.Module, drop: Mapping[int, Iterable[int]], *, how: dict | None = None) -> nn.Module:
    """Remove these experts {ORIGINAL layer: [ORIGINAL expert indices]} in place; returns the model.

    `how` (e.g. {"chosen_by": "reap"}) is stored in the provenance history beside the dropped experts.
    """
    cut = plan_expert_cut(model, drop)
    spec = moe_spec(model)
    for layer in moe_layers(model):
        positions = cut.keep[layer.original]
        if len(positions) != layer.num_experts:
            for module in (layer.router, layer.experts):
                _slice_experts(module, positions)
    config = model.config.get_text_config()
    setattr(config, spec.count_field, cut.num_experts)
    if isinstance(getattr(model, "num_experts", None), int):  # the *ForCausalLM's load-balancing loss
        model.num_experts = cut.num_experts
    record = provenance(model)
    dropped = {str(o): experts for o, experts in cut.dropped.items()}
    history = [*record.get("history", []), {"dropped_experts": dropped, **(how or {})}]
    model.config.layerprune = {**record, RECORD_KEY: cut.record, "history": history}
    return model


def _slice_experts(module: nn.Module, positions: list[int]) -> None:
    """Keep these rows (axis 0) of every tensor the module holds itself; its `num_experts` follows."""
    with torch.no_grad():
        for name, tensor in expert_tensors(module).items():
            index = torch.tensor(positions, dtype=torch.long, device=tensor.device)
            kept = tensor.detach().index_select(0, index).clone()
            if isinstance(tensor, nn.Parameter):
                module._parameters[name] = nn.Parameter(kept, requires_grad=tensor.requires_grad)
            else:
                module._buffers[name] = kept
    if isinstance(getattr(module, "num_experts", None), int):
        module.num_experts = len(positions)


def _checked_layers(layer_record: dict, drop, moe_originals: list[int]) -> dict[int, list]:
    if not isinstance(drop, Mapping):
        raise LayerpruneError("experts to remove must be a mapping {layer index: [expert indices]}")
    drop = {layer: list(experts) for layer, experts in drop.items()}
    if not any(drop.values()):
        raise LayerpruneError("no experts to remove were given")
    check_layer_indices(layer_record, list(drop))
    layers = sorted(moe_originals)
    dense = sorted(layer for layer in drop if layer not in layers)
    if dense:
        raise LayerpruneError(f"layers {dense} have no mixture-of-experts block (MoE layers: {sorted(layers)})")
    return drop


def _checked_experts(layer: int, experts: list, kept: list[int], original_n: int) -> list[int]:
    duplicates = sorted({e for e in experts if experts.count(e) > 1})
    if duplicates:
        raise LayerpruneError(f"duplicate expert indices in layer {layer}: {duplicates}")
    for expert in experts:
        if not isinstance(expert, int) or isinstance(expert, bool):
            raise LayerpruneError(f"expert indices must be integers, got {expert!r} (layer {layer})")
        if expert < 0 or expert >= original_n:
            raise LayerpruneError(
                f"expert index {expert} (layer {layer}) is out of range: the original model has {original_n} "
                f"experts per layer (0..{original_n - 1})"
            )
        if expert not in kept:
            raise LayerpruneError(f"expert {expert} of layer {layer} was already removed")
    return sorted(experts)


def _check_layout(layer: MoeLayer, n_experts: int) -> None:
    """Every tensor of the router and the experts has the expert on axis 0 (else this is not a layout we know)."""
    for module in (layer.router, layer.experts):
        for name, tensor in expert_tensors(module).items():
            if tensor.ndim == 0 or tensor.shape[0] != n_experts:
                raise LayerpruneError(
                    f"layer {layer.original}: {type(module).__name__}.{name} has shape {tuple(tensor.shape)}, not "
                    f"{n_experts} experts on its first axis; this layout (quantized or custom experts?) cannot be cut"
                )


def _describe(counts: dict[int, int]) -> str:
    return ", ".join(f"layer {layer}: {n}" for layer, n in counts.items())


def expert_summary(model: nn.Module) -> list[tuple[str, str]]:
    """Rows (label, text) for `layerprune info`: experts per MoE layer, routing, what went; [] for a dense model."""
    try:
        spec, layers = moe_spec(model), moe_layers(model)
    except LayerpruneError:
        return []
    record = expert_record(model)
    config = model.config.get_text_config()
    counts = sorted({layer.num_experts for layer in layers})
    rows = [
        ("MoE layers (original indices)", ",".join(str(layer.original) for layer in layers)),
        ("experts per MoE layer", f"{'/'.join(map(str, counts))} (original {record['original_num_experts']}), "
                                  f"top-{config.num_experts_per_tok}"),
        ("routing", spec.routing),
    ]
    for layer, experts in record["dropped"].items():
        if experts:
            rows.append((f"experts removed, layer {layer}", ",".join(map(str, experts))))
    return rows
