"""Built-in expert metrics (higher = keep), from one calibration pass (routing.py).

REAP: "REAP the Experts: Why Pruning Prevails for One-Shot MoE Compression" (Lasby et al., arXiv 2510.13999),
router-weighted expert activation pruning: S_j = (1/|X_j|) sum_{x in X_j} g_j(x) ||f_j(x)||_2, X_j the tokens
routed to expert j (j in their top-k), f_j(x) expert j's output, g_j(x) its gate value. Frequency, the soft
count (router-weight sum) and the expert activation norm are the baselines that paper compares against.

g_j(x) here is the weight the stock router gives expert j for token x, i.e. what multiplies f_j(x) in the
block's output (so g_j(x) ||f_j(x)|| is the size of what the expert adds to the residual stream): the
renormalised top-k softmax for Mixtral and for Qwen/OLMoE with norm_topk_prob, the plain softmax probability
without it, the softmax over the k chosen logits for GPT-OSS and Granite-MoE, DeepSeek's weights times
routed_scaling_factor. (REAP's reference code takes softmax(router logits), optionally renormalised over the
top-k; the two agree for the softmax-then-top-k families.) Every mean and sum is over real tokens only.
"""

from __future__ import annotations

import torch

from layerprune.errors import LayerpruneError
from layerprune.importance.experts.registry import register_expert_metric
from layerprune.importance.experts.routing import LayerRouting


def _per_token(sums: torch.Tensor, stats: LayerRouting) -> list[float]:
    return (sums / max(stats.tokens, 1)).tolist()


@register_expert_metric("frequency", description="share of the real tokens routed to the expert (top-k hits / tokens)")
def frequency(stats: LayerRouting, layer: int, n_experts: int) -> list[float]:
    return _per_token(stats.count, stats)


@register_expert_metric(
    "soft-count", description="router-weight sum: the gate values the expert receives, per real token"
)
def soft_count(stats: LayerRouting, layer: int, n_experts: int) -> list[float]:
    return _per_token(stats.weight_sum, stats)


@register_expert_metric(
    "reap", needs_outputs=True,
    description="REAP (arXiv 2510.13999): mean over the tokens routed to the expert of gate value x ||expert output||",
)
def reap(stats: LayerRouting, layer: int, n_experts: int) -> list[float]:
    # An expert no token was routed to contributed nothing: 0.
    return torch.where(stats.count > 0, stats.weighted_norm_sum / stats.count.clamp_min(1), 0.0).tolist()


@register_expert_metric(
    "activation-norm", needs_outputs=True,
    description="expert activation norm: sum of ||expert output|| over the tokens routed to it, per real token",
)
def activation_norm(stats: LayerRouting, layer: int, n_experts: int) -> list[float]:
    return _per_token(stats.norm_sum, stats)


@register_expert_metric("random", needs_calibration=False, description="uniform random scores (seeded): the floor")
def random_scores(stats, layer: int, n_experts: int, seed: int = 0) -> list[float]:
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise LayerpruneError(f"random: seed must be an integer, got {seed!r}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)  # one stream per (seed, ORIGINAL layer)
    return torch.rand(n_experts, generator=generator, dtype=torch.float64).tolist()
