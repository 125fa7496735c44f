"""Dtype names as users and configs spell them, turned into torch dtypes in one place."""

from __future__ import annotations

import torch

from layerprune.errors import LayerpruneError

_NAMED = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}
# safetensors header dtype names of the float types, as torch dtypes
SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    """A torch dtype for bf16 | fp16 | fp32 (or their torch names); "auto" (as stored) passes through."""
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in _NAMED:
        raise LayerpruneError(f"unknown dtype {dtype!r}; choose one of auto, bf16, fp16, fp32")
    return _NAMED[name]


def stored_dtype(config) -> torch.dtype | None:
    """The dtype a model config says its weights are stored in, or None when it says nothing usable."""
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):  # configs written by older transformers keep the name
        stored = getattr(torch, stored.removeprefix("torch."), None)
    return stored if isinstance(stored, torch.dtype) else None
