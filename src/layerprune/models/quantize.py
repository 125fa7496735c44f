"""bitsandbytes quantization at load time (`--load-in 4bit|8bit`) and what a quantized model records.

4bit = NF4 weights (bitsandbytes Linear4bit), 8bit = LLM.int8 (Linear8bitLt); both run on CPU with
bitsandbytes 0.50. Only the decoder's and head's Linear layers are quantized; embeddings and norms
keep the load dtype. Packed weights are real parameters (uint8 / int8), so sizes count their bytes.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.hardware.compute import compute_choice

LOAD_IN = ("4bit", "8bit")


def check_load_in(load_in: str | None) -> str | None:
    """None, '4bit' or '8bit'; anything else is a user error. Also checks bitsandbytes is importable."""
    if load_in is None:
        return None
    text = str(load_in).strip().lower()
    if text in ("", "none"):
        return None
    if text not in LOAD_IN:
        raise LayerpruneError(f"unknown --load-in {load_in!r}; choose 4bit or 8bit")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise LayerpruneError(
            f"--load-in {text} needs bitsandbytes: pip install 'layerprune[qlora]' ({err})"
        ) from None
    return text


def bnb_config(load_in: str, compute_dtype: torch.dtype | None = None):
    """BitsAndBytesConfig for '4bit' (NF4, compute in `compute_dtype`, bf16 by default) or '8bit' (LLM.int8)."""
    from transformers import BitsAndBytesConfig

    if load_in == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16
    )


def compute_dtype_for(torch_dtype, device: str | None) -> torch.dtype:
    """The 4-bit matmul dtype: the requested one, else what hardware.compute picks for the device (bf16
    where native, fp16 on GPUs without bf16, fp32 on CPUs without native bf16)."""
    if isinstance(torch_dtype, torch.dtype):
        return torch_dtype

    return compute_choice(device or "cpu").torch_dtype


def prepare_for_inference(model: nn.Module, load_in: str) -> None:
    """Settle bitsandbytes' CPU quirks once the quantized model is loaded."""
    if load_in == "4bit":
        disable_cpu_repacking(model)
    else:
        # LLM.int8 casts non-fp16 inputs to fp16 and logs that on every matmul; once per run is noise enough.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)


def disable_cpu_repacking(model: nn.Module) -> int:
    """Keep bitsandbytes from repacking 4-bit weights for its AVX512-BF16 CPU kernel. Returns the layers touched.

    The repack runs on the first no-grad CPU forward: it fails on layers narrower than a quant block
    (tiny models), makes later LoRA gradients wrong (QLoRA), and measured no faster on SmolLM2-sized
    layers. Turning it off keeps one packed layout for eval, bench and training.
    """
    import bitsandbytes as bnb

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


def quantization_record(model: nn.Module) -> dict | None:
    """What eval.json / bench.json say about a quantized model; None for a plain one."""
    config = getattr(model, "hf_quantizer", None)
    config = getattr(config, "quantization_config", None) if config is not None else None
    if config is None or getattr(config, "quant_method", None) != "bitsandbytes":
        return None
    from importlib.metadata import version

    if config.load_in_4bit:
        compute = str(config.bnb_4bit_compute_dtype).replace("torch.", "")
        record = {"load_in": "4bit", "quant_type": config.bnb_4bit_quant_type, "compute_dtype": compute}
    else:
        record = {"load_in": "8bit", "quant_type": "llm.int8", "threshold": config.llm_int8_threshold}
    linear = sum(1 for m in model.modules() if is_bnb_linear(m))
    return {**record, "method": "bitsandbytes", "bitsandbytes": version("bitsandbytes"), "quantized_linears": linear}


def is_bnb_linear(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def logical_numel(p: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight holds two per byte (its quant_state knows the shape)."""
    state = getattr(p, "quant_state", None)
    shape = getattr(state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else p.numel()


def stored_bytes(p: torch.Tensor) -> int:
    """Bytes a parameter occupies, with the scales bitsandbytes keeps beside packed weights."""
    size = p.numel() * p.element_size()
    state = getattr(p, "quant_state", None)
    if state is not None:  # 4-bit: absmax per block (+ the nested quantization's own state)
        size += sum(t.numel() * t.element_size() for t in state.as_dict(packed=False).values()
                    if isinstance(t, torch.Tensor))
    scales = getattr(p, "SCB", None)
    if isinstance(scales, torch.Tensor):  # 8-bit: one fp32 scale per output row
        size += scales.numel() * scales.element_size()
    return size
