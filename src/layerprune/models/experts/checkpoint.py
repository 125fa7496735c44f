"""Cut experts from a safetensors checkpoint on disk (`prune --no-load --drop-experts`): a plan over the tensors'
names and shapes from the headers, executed by models/checkpoint.py as byte copies (no tensor is decoded).

How checkpoints spell mixture-of-experts blocks (transformers 5 writes them so; released checkpoints too):
- one tensor per expert, `<layers>.<i>.<block>.experts.<j>.<rest>` (Mixtral `block_sparse_moe.experts.<j>.w1|w2|w3`;
  Qwen2/3-MoE, OLMoE, DeepSeek `mlp.experts.<j>.gate_proj|up_proj|down_proj`): a removed expert's tensors are left
  out, the kept ones renumbered 0..n-1 in their order;
- every expert on axis 0: the routers (`gate.weight`, `router.weight` and `router.bias`, `router.layer.weight`,
  DeepSeek-V3's `gate.e_score_correction_bias`), GPT-OSS's fused `experts.gate_up_proj[_bias]` and
  `experts.down_proj[_bias]` (MXFP4 `_blocks` / `_scales` too), Granite-MoE's `input_linear.weight` and
  `output_linear.weight`: the kept rows, each row's bytes as stored;
- shared experts (`shared_expert*`) and dense layers: untouched.
A layer's block is a MoE block when it holds a router with one row per expert. Anything else inside a MoE block
is refused rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from layerprune.errors import LayerpruneError
from layerprune.models.experts.anatomy import config_moe_spec
from layerprune.models.experts.surgery import RECORD_KEY, check_expert_cut, config_expert_record

BLOCKS = ("block_sparse_moe", "mlp")  # where a decoder layer keeps its MoE block on disk
ROUTERS = ("gate.weight", "router.weight", "router.layer.weight")


@dataclass(frozen=True)
class TensorCut:
    """What becomes of one tensor of a MoE block: its name in the same layer (None: it goes), and the rows
    (axis 0) it keeps (None: all)."""

    name: str | None
    rows: tuple[int, ...] | None = None


def moe_blocks_on_disk(shapes: Mapping[str, tuple], prefix: str, n_layers: int, n_experts: int) -> dict[int, str]:
    """{stored layer position: "<prefix>.<i>.<block>"} of the layers whose block has a router of n_experts rows."""
    found = {}
    for i in range(n_layers):
        for block in BLOCKS:
            head = f"{prefix}.{i}.{block}"
            if any((shapes.get(f"{head}.{router}") or (None,))[0] == n_experts for router in ROUTERS):
                found[i] = head
                break
    return found


def plan_expert_tensors(shapes: Mapping[str, tuple], blocks: dict[int, str], keep: dict[int, list[int]],
                        n_experts: int) -> dict[str, TensorCut]:
    """{name: TensorCut} for every tensor of the MoE blocks of the stored layers in `keep` (stored position ->
    positions of its current experts that stay). Pure."""
    plan = {}
    for name, shape in shapes.items():
        for i, head in blocks.items():
            if i in keep and name.startswith(head + "."):
                plan[name] = _tensor_cut(name, name[len(head) + 1:], tuple(shape), head, keep[i], n_experts)
    return plan


def _tensor_cut(name: str, rest: str, shape: tuple, head: str, keep: list[int], n_experts: int) -> TensorCut:
    if rest.startswith("shared"):
        return TensorCut(name)
    per_expert = re.fullmatch(r"experts\.(\d+)\.(.+)", rest)
    if per_expert:
        j = int(per_expert[1])
        return TensorCut(f"{head}.experts.{keep.index(j)}.{per_expert[2]}" if j in keep else None)
    if shape and shape[0] == n_experts:
        return TensorCut(name, tuple(keep))
    raise LayerpruneError(
        f"{name} (shape {list(shape)}) is neither one expert's tensor nor every expert's on axis 0; this "
        "checkpoint's experts cannot be cut on disk (prune it without --no-load)"
    )


def cut_experts_on_disk(config, shapes: Mapping[str, tuple], prefix: str, kept_before: list[int],
                        keep_positions: list[int], layer_record: dict, drop: Mapping, how: dict):
    """Check and plan an expert cut of a checkpoint whose layers are also cut to `keep_positions`.

    kept_before: the ORIGINAL index of each stored layer; layer_record: the provenance after the layer cut.
    Returns ({name: TensorCut}, the provenance record after the cut, the expert summary for PruneResult); the
    config's expert count is rewritten in place.
    """
    spec = config_moe_spec(config)
    text_config = config.get_text_config()
    n_experts = int(getattr(text_config, spec.count_field))
    blocks = moe_blocks_on_disk(shapes, prefix, len(kept_before), n_experts)
    if not blocks:
        raise LayerpruneError(f"no mixture-of-experts block with {n_experts} experts found in this checkpoint")
    remaining = {p: kept_before[p] for p in keep_positions if p in blocks}  # stored position -> ORIGINAL layer
    record = config_expert_record(config, spec, list(remaining.values()), layer_record)
    cut = check_expert_cut(spec, text_config, layer_record, record, list(remaining.values()), drop)
    plan = plan_expert_tensors(shapes, blocks, {p: cut.keep[o] for p, o in remaining.items()}, n_experts)
    setattr(text_config, spec.count_field, cut.num_experts)
    dropped = {str(o): experts for o, experts in cut.dropped.items()}
    history = [*layer_record.get("history", []), {"dropped_experts": dropped, **how}]
    summary = {"dropped": dropped, "chosen_by": how.get("chosen_by", "explicit"),
               "experts_per_layer": n_experts - cut.num_experts}
    return plan, {**layer_record, RECORD_KEY: cut.record, "history": history}, summary
