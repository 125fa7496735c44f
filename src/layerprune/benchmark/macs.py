"""MACs of a forward and of one decoding step, counted on a real run.

torch's FlopCounterMode on a real forward (FLOPs = 2 * MACs). It counts matmuls, including
attention (QK^T and AV over the full T x T square, causal mask not discounted, as torch and
LLM-Pruner count). torch registers SDPA formulas for the CUDA kernels only, so the CPU kernel is
mapped to the same formula here. Kernels outside torch (flash-attn 2) are not seen. Element-wise
work (norms, activations, softmax, RoPE) is not counted. MoE models count the experts that ran.
bitsandbytes 4/8-bit linears run custom kernels: their MACs come from forward hooks (rows x in x out).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from layerprune.benchmark.inputs import check_length
from layerprune.hardware.timing import model_device
from layerprune.models.anatomy import get_anatomy
from layerprune.models.quantize import is_bnb_linear

_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_ops() -> set:
    """Op packets whose FLOPs are attention (SDPA kernels and the bmm of eager attention)."""
    aten = torch.ops.aten
    names = [
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward", "_efficient_attention_forward", "bmm", "baddbmm",
    ]
    return {getattr(aten, n) for n in names if hasattr(aten, n)}


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    # torch only knows the CUDA SDPA kernels; without this the CPU kernel's attention counts as 0.
    mapping = {_CPU_SDPA: _sdpa_flops} if _CPU_SDPA is not None else {}
    return FlopCounterMode(display=False, custom_mapping=mapping)


@contextlib.contextmanager
def _packed_linear_macs(model: nn.Module):
    """{module name: MACs} of bitsandbytes Linear4bit/8bitLt calls: their custom kernels are invisible to
    FlopCounterMode, so their MACs (rows x in x out, as for nn.Linear) are counted from forward hooks."""
    macs: dict[str, int] = {}

    def hook(name):
        def count(module, inputs, output):
            rows = inputs[0].numel() // module.in_features
            macs[name] = macs.get(name, 0) + rows * module.in_features * module.out_features
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if is_bnb_linear(m)]
    try:
        yield macs
    finally:
        for handle in handles:
            handle.remove()


def _unseen_macs(model: nn.Module, packed: dict[str, int], counts: dict) -> dict[str, int]:
    # Paths that dequantize and then call a torch matmul (bnb on GPU, several tokens) are seen: count the rest.
    root = type(model).__name__
    return {n: max(0, m - sum(counts.get(f"{root}.{n}", {}).values()) // 2) for n, m in packed.items()}


def _summarize_flops(model: nn.Module, counts: dict, batch_size: int, unseen: dict[str, int] | None = None) -> dict:
    anatomy = get_anatomy(model)
    root = type(model).__name__
    attention_ops = _attention_ops()
    glob = counts.get("Global", {})
    unseen = unseen or {}
    flops = sum(glob.values()) + 2 * sum(unseen.values())
    attention = sum(v for op, v in glob.items() if op in attention_ops)
    per_layer = [
        sum(counts.get(f"{root}.{anatomy.layers_path}.{i}", {}).values()) // 2
        + sum(m for n, m in unseen.items() if n.startswith(f"{anatomy.layers_path}.{i}."))
        for i in range(anatomy.num_layers)
    ]
    by_op = {str(op): v // 2 for op, v in glob.items()}
    if unseen:
        by_op["bitsandbytes linear (hooks)"] = sum(unseen.values())
    return {
        "macs": flops // 2,
        "flops": flops,
        "attention_macs": attention // 2,
        "per_layer_macs": per_layer,
        "batch_size": batch_size,
        "by_op": by_op,
    }


@torch.inference_mode()
def count_macs(model: nn.Module, seq_len: int = 64, batch_size: int = 1, input_ids: torch.Tensor | None = None) -> dict:
    """MACs (and FLOPs = 2 MACs) of one full forward of batch_size x seq_len tokens, logits at every position."""
    check_length(model, seq_len, f"a {seq_len}-token forward")
    if input_ids is None:
        input_ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch_size, seq_len))
    input_ids = input_ids.to(model_device(model))
    counter = _flop_counter()
    with _packed_linear_macs(model) as packed, counter:
        model(input_ids=input_ids, use_cache=False)
    counts = counter.get_flop_counts()
    result = _summarize_flops(model, counts, input_ids.shape[0], _unseen_macs(model, packed, counts))
    return {"seq_len": input_ids.shape[1], **result, "counted_with": "torch.utils.flop_counter.FlopCounterMode"}


@torch.inference_mode()
def decode_macs(model: nn.Module, context: int, input_ids: torch.Tensor | None = None) -> int:
    """MACs of generating one token with `context` tokens already in the KV cache (batch 1)."""
    check_length(model, context + 1, f"decoding at context {context}")
    if input_ids is None:
        input_ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, context + 1))
    input_ids = input_ids[:, : context + 1].to(model_device(model))
    cache = model(input_ids=input_ids[:, :context], use_cache=True).past_key_values
    counter = _flop_counter()
    with _packed_linear_macs(model) as packed, counter:
        model(input_ids=input_ids[:, context:], past_key_values=cache, use_cache=True)
    counts = counter.get_flop_counts()
    return sum(counts.get("Global", {}).values()) // 2 + sum(_unseen_macs(model, packed, counts).values())
