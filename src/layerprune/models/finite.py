"""Weights that hold NaN or infinity, found before any work reads them.

One such tensor makes every layer's score NaN (the hidden states carry it forward), and a ranking of NaN
scores still "chooses" layers; a model saved with them measures noise ever after.
"""

from __future__ import annotations

import torch

from layerprune.errors import LayerpruneError


def non_finite_parameters(model) -> list[str]:
    """Names of the floating-point parameters that hold NaN or infinity (meta tensors, not loaded, skipped).
    Parameters only: some models keep -inf masks as buffers on purpose."""
    with torch.no_grad():
        return [name for name, p in model.named_parameters()
                if p.is_floating_point() and not p.is_meta and not bool(torch.isfinite(p).all())]


def check_finite_parameters(model, why: str) -> None:
    """Refuse a model with non-finite weights in one line naming (the first three of) the tensors."""
    names = non_finite_parameters(model)
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise LayerpruneError(f"the model holds NaN or infinite weights in {shown}; {why}")
