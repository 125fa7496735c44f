"""Metrics computed from a layer's weights: magnitude (data-free) and first-order Taylor.

Both come from Shortened LLaMA (Kim et al., 2024, arXiv 2402.02834, section 3.1), as used by
"Reassessing Layer Pruning in LLMs: New Insights and Methods" (arXiv 2411.15558, section 3.1):

- magnitude-l1 / magnitude-l2: I_n = Σ_k ‖W^{k,n}‖_p over the weight matrices k of block n.
- taylor: I_n = Σ_k Σ_ij |∂L(D)/∂W^{k,n}_ij · W^{k,n}_ij|, L(D) the LM loss on the calibration set.

Which weights: the paper defines both over "the linear weight matrix W^{k,n} ... k the type of
operation (e.g. a query projection or an up projection)", so by default only the block's weight
matrices are scored: parameters with ndim >= 2 (linear / Conv1D weights, MoE routers, stacked
expert weights). Biases are never scored. The authors' code (and that of arXiv 2411.15558) additionally sums
the 1-D norm scales (`input_layernorm.weight`, ...): pass `include_norms=True` to do the same.
Aggregation is a plain sum over entries and over matrices (the paper reports "sum" as the best of
sum/mean/product/max). Taylor+ is Taylor plus a selection rule (keep the first four and last two
blocks out of the candidates); that rule belongs to layer selection, not to the score.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.importance.registry import register_metric
from layerprune.models.anatomy import get_anatomy

IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------
# Which parameters of a block are scored
# ---------------------------------------------------------------------------------------------


def scored_parameters(block: nn.Module, include_norms: bool = False) -> list[tuple[str, nn.Parameter]]:
    """The block's weight matrices (ndim >= 2); with include_norms, also its 1-D `*weight` norm scales.

    Biases are never included. A parameter shared inside the block is listed once.
    """
    chosen, seen = [], set()
    for name, param in block.named_parameters():
        if id(param) in seen:
            continue
        is_matrix = param.ndim >= 2
        is_norm_scale = param.ndim == 1 and name.endswith("weight")
        if is_matrix or (include_norms and is_norm_scale):
            seen.add(id(param))
            chosen.append((name, param))
    return chosen


def _as_matrices(w: torch.Tensor) -> torch.Tensor:
    """[..., out, in] -> [k, out, in]: a stacked parameter (fused MoE experts) is one matrix per expert.
    A 1-D norm scale is one [1, d] matrix, whose Frobenius norm is its L2 norm."""
    return w.reshape(1, 1, -1) if w.ndim == 1 else w.reshape(-1, w.shape[-2], w.shape[-1])


def l1_norm(w: torch.Tensor) -> float:
    """Entrywise Σ|w_ij| (accumulated in float64)."""
    return float(w.detach().abs().sum(dtype=torch.float64))


def frobenius_norms_sum(w: torch.Tensor) -> float:
    """Σ over the matrices in w of ‖W‖_F (float64)."""
    norms = torch.linalg.vector_norm(_as_matrices(w.detach()), ord=2, dim=(-2, -1), dtype=torch.float64)
    return float(norms.sum())


def magnitude_scores(model, norm, include_norms: bool = False) -> list[float]:
    layers = get_anatomy(model).layers
    return [math.fsum(norm(p) for _, p in scored_parameters(block, include_norms)) for block in layers]


@register_metric(
    "magnitude-l1",
    needs_calibration=False,
    description="Shortened LLaMA magnitude: sum of |w| over the layer's weight matrices",
)
def magnitude_l1(model, calibration=None, include_norms: bool = False) -> list[float]:
    """Σ_k ‖W_k‖_1 (entrywise sum of |w|) over the block's weight matrices (ndim >= 2; biases and
    norm scales excluded unless include_norms=True). Larger weights = more important."""
    return magnitude_scores(model, l1_norm, include_norms)


@register_metric(
    "magnitude-l2",
    needs_calibration=False,
    description="Shortened LLaMA magnitude: sum of Frobenius norms of the layer's weight matrices",
)
def magnitude_l2(model, calibration=None, include_norms: bool = False) -> list[float]:
    """Σ_k ‖W_k‖_F over the block's weight matrices (ndim >= 2; biases and norm scales excluded
    unless include_norms=True; a stacked [E, out, in] expert weight counts as E matrices).

    Note: the authors' script with norm_power=2 sums squared entries, Σ_k ‖W_k‖_F², which can rank
    blocks differently; this follows the formula in the papers (Σ_k ‖W_k‖_2).
    """
    return magnitude_scores(model, frobenius_norms_sum, include_norms)


# ---------------------------------------------------------------------------------------------
# Taylor
# ---------------------------------------------------------------------------------------------


def lm_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels for next-token loss: padding positions, and a real token right after padding (left
    padding: it would be predicted from a pad), are IGNORE_INDEX."""
    real = attention_mask.bool()
    after_pad = torch.zeros_like(real)
    after_pad[:, 1:] = ~real[:, :-1]
    return torch.where(real & ~after_pad, input_ids, IGNORE_INDEX)


def count_predicted(labels: torch.Tensor) -> int:
    """Tokens that enter the loss: every label except the first position's (nothing predicts it)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over predicted tokens of the next-token cross entropy (computed in float32)."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten().to(logits.device),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def taylor_saliency(param: torch.Tensor) -> float:
    """Σ |grad ⊙ w| in float64 (the product itself in the model's dtype)."""
    return float((param.grad * param.detach()).abs().sum(dtype=torch.float64))


class _GradState:
    """Make only the scored block parameters require grad; restore flags, grads and mode on exit."""

    def __init__(self, model: nn.Module, scored: list[nn.Parameter]):
        self.model = model
        self.scored = scored

    def __enter__(self) -> "_GradState":
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.grads = [(p, p.grad) for p in self.scored]
        self.was_training = self.model.training
        for p, _ in self.flags:
            p.requires_grad_(False)  # embeddings / lm_head never need a gradient
        for p in self.scored:
            p.grad = None
            p.requires_grad_(True)
        self.model.eval()  # no dropout: the score must be deterministic
        return self

    def __exit__(self, *exc) -> None:
        for p in self.scored:
            p.grad = None
        for p, grad in self.grads:
            p.grad = grad
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.was_training)


@register_metric(
    "taylor",
    needs_calibration=True,
    description="Shortened LLaMA Taylor: sum of |grad * w| over the layer's weights, grad of the calibration LM loss",
    forward_passes=lambda n: 3.0,  # a forward and a backward
)
def taylor(model, calibration, batch_size: int | None = None, include_norms: bool = False) -> list[float]:
    """Σ_k Σ_ij |∂L(D)/∂W_ij · W_ij| over the block's weight matrices (ndim >= 2; biases never,
    norm scales only with include_norms=True, as in the authors' code).

    L(D) is the mean next-token loss over every real token of the calibration set (labels =
    input_ids, padding ignored). The absolute value is taken on the gradient of the WHOLE loss:
    - batch_size None or >= N (default): one forward/backward; each parameter's |g ⊙ W| is reduced
      to a scalar as soon as its gradient is ready and the gradient is freed at once, so gradients
      of the whole model are never held together;
    - batch_size < N: per-batch losses (each scaled by the total token count) are backpropagated
      and their gradients accumulate in `.grad`, so this case holds one gradient per scored weight
      until the last batch, where the reduction happens as above.
    The model's requires_grad flags, existing `.grad`s and train/eval mode are restored afterwards.
    """
    layers = get_anatomy(model).layers
    per_block = [[p for _, p in scored_parameters(block, include_norms)] for block in layers]
    block_of = {id(p): i for i, params in enumerate(per_block) for p in params}
    scored = [p for params in per_block for p in params]

    n = calibration.num_samples
    batch_size = n if batch_size is None else batch_size
    if batch_size < 1:
        raise LayerpruneError(f"batch_size must be >= 1, got {batch_size}")
    total = count_predicted(lm_labels(calibration.input_ids, calibration.attention_mask))
    if total == 0:
        raise LayerpruneError("taylor: the calibration data has no token to predict (every sample is 1 token long)")

    sums = [0.0] * len(layers)
    final = {"batch": False}

    def reduce_and_free(param: torch.Tensor) -> None:
        if final["batch"]:
            sums[block_of[id(param)]] += taylor_saliency(param)
            param.grad = None

    device = get_anatomy(model).embeddings.weight.device
    batches = list(calibration.batches(batch_size))
    with _GradState(model, scored):
        handles = [p.register_post_accumulate_grad_hook(reduce_and_free) for p in scored]
        try:
            for b, (ids, mask) in enumerate(batches):
                final["batch"] = b == len(batches) - 1
                labels = lm_labels(ids, mask)
                if count_predicted(labels) == 0:
                    continue
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
                # Scale by the TOTAL count so the accumulated gradient is that of the mean over all tokens.
                (summed_lm_loss(logits, labels) / total).backward()
                del logits
            # Parameters whose gradient arrived only in earlier batches (or an all-padding last
            # batch, or an expert no token of the last batch was routed to) are reduced here.
            final["batch"] = True
            for p in scored:
                if p.grad is not None:
                    reduce_and_free(p)
        finally:
            for handle in handles:
                handle.remove()
    return sums
