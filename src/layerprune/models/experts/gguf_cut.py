"""Cut experts from a GGUF file: which tensors hold every expert on their outer axis, and the checked cut.

llama.cpp names a MoE block's tensors `blk.<i>.ffn_gate_inp.weight` (the router, [E, hidden]),
`blk.<i>.ffn_{gate,up,down}_exps.weight` (the experts, [E, ...]), `ffn_gate_up_exps`, `exp_probs_b.bias`
(DeepSeek-V3's correction bias) and expert biases `ffn_*_exps.bias`; the expert is the outermost axis, and a
quantized tensor's blocks run along its innermost one, so each expert's slice is whole quantization blocks
and is cut as stored. Shared experts (`*_shexp`) and dense blocks are untouched; `{arch}.expert_count`
becomes the number kept. GGUF architectures and the transformers family whose routing they share:
qwen2moe (Qwen2-MoE), qwen3moe (Qwen3-MoE), llama with experts (Mixtral).
"""

from __future__ import annotations

import re
from types import SimpleNamespace
from typing import Mapping

from layerprune.errors import LayerpruneError
from layerprune.models.experts.anatomy import model_type_moe_spec
from layerprune.models.experts.surgery import RECORD_KEY, check_expert_cut

GGUF_MOE_FAMILIES = {"llama": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
_EXPERT_TENSOR = re.compile(r"^blk\.(\d+)\.(ffn_(gate|up|down|gate_up)_exps|ffn_gate_inp|exp_probs_b)\.(weight|bias)$")


def cut_gguf_experts(arch: str, n_experts: int | None, used: int | None, shapes: Mapping[str, tuple],
                     kept_before: list[int], keep_positions: list[int], layer_record: dict, drop: Mapping, how: dict):
    """Check and plan an expert cut of a GGUF file whose blocks are also cut to `keep_positions`.

    shapes: {tensor name: numpy shape (outer axis first)}; kept_before: the ORIGINAL index of each stored block.
    Returns ({tensor name: rows kept}, the new expert count, the record after the cut, the summary for PruneResult).
    """
    if arch not in GGUF_MOE_FAMILIES or not isinstance(n_experts, int) or n_experts < 1:
        raise LayerpruneError(f"this GGUF file ({arch}) has no experts to remove (expert cuts: "
                              f"{', '.join(f'{a} with experts' if a == 'llama' else a for a in GGUF_MOE_FAMILIES)})")
    spec = model_type_moe_spec(GGUF_MOE_FAMILIES[arch])
    blocks = sorted({int(m[1]) for name in shapes if (m := _EXPERT_TENSOR.match(name)) and m[2] == "ffn_gate_inp"})
    remaining = {p: kept_before[p] for p in keep_positions if p in blocks}  # stored block -> ORIGINAL layer
    record = layer_record.get(RECORD_KEY)
    if not (isinstance(record, dict) and "kept" in record):
        record = {"original_num_experts": n_experts, "kept": {str(o): list(range(n_experts)) for o in remaining.values()},
                  "dropped": {str(o): [] for o in remaining.values()}}
    cut = check_expert_cut(spec, SimpleNamespace(num_experts_per_tok=used or 1), layer_record, record,
                           list(remaining.values()), drop)
    rows = {}
    for name, shape in shapes.items():
        match = _EXPERT_TENSOR.match(name)
        if match and int(match[1]) in remaining:
            if not shape or shape[0] != n_experts:
                raise LayerpruneError(f"GGUF tensor {name} has shape {list(shape)}, not {n_experts} experts outermost")
            rows[name] = tuple(cut.keep[remaining[int(match[1])]])
    dropped = {str(o): experts for o, experts in cut.dropped.items()}
    history = [*layer_record.get("history", []), {"dropped_experts": dropped, **how}]
    summary = {"dropped": dropped, "chosen_by": how.get("chosen_by", "explicit"),
               "experts_per_layer": n_experts - cut.num_experts}
    return rows, cut.num_experts, {**layer_record, RECORD_KEY: cut.record, "history": history}, summary
