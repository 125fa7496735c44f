"""Healing that cannot lie: a loss or gradient that becomes NaN or infinite stops the heal with one error
naming the step, and weights that are not finite are never returned or saved.

A diverged heal used to exit 0, print "final loss 0.0000" (the Trainer's running mean of NaN) and save
NaN weights; every later stage then measured noise.
"""

from __future__ import annotations

import math

import torch

from layerprune.errors import LayerpruneError


def diverged(what: str, value: float, step: int, learning_rate: float) -> LayerpruneError:
    return LayerpruneError(
        f"healing diverged: the {what} became {value} at step {step}; lower the learning rate (now "
        f"{learning_rate:g}) or keep gradient clipping on (max_grad_norm), then rerun; nothing was saved")


def check_loss(loss: torch.Tensor, step: int, learning_rate: float) -> None:
    """Raise at the first non-finite training loss (one value: the sync costs nothing next to a step)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise diverged("training loss", value, step, learning_rate)


def finite_guard(learning_rate: float):
    """A TrainerCallback that stops at a logged loss or gradient norm that is not finite (the grad norm is
    logged before clipping, so an infinite gradient shows there even when the loss is still finite)."""
    from transformers import TrainerCallback

    class FiniteGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key, what in (("loss", "training loss"), ("grad_norm", "gradient norm")):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise diverged(what, value, state.global_step, learning_rate)

    return FiniteGuard()


def check_finite_weights(model, what: str = "the healed model") -> None:
    """Refuse weights that hold NaN or infinity (before they are saved or used), naming the first tensor."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise LayerpruneError(f"{what} holds non-finite weights (NaN or infinity) in {name}: the heal "
                                      "diverged; lower the learning rate and rerun; nothing was saved")
