"""Each MoE family's routing, and what it becomes when experts are removed.

Removing experts is exact when the pruned model computes what the unpruned model computes with the removed
experts' router logits set to minus infinity (they are never chosen and take no probability mass). For
every family below that is what slicing the experts and the router's rows gives, with these semantics:

- Mixtral: softmax over the experts' logits, top-k, the k weights renormalised to sum to 1. After removal
  the softmax runs over the remaining experts; a token whose top-k held no removed expert routes as before.
- Qwen2-MoE, Qwen3-MoE, OLMoE: softmax, then top-k; the k weights are renormalised only with
  `norm_topk_prob`. Without it (Qwen2-MoE, OLMoE checkpoints) a token's weights are softmax probabilities
  over the REMAINING experts, so every kept expert's weight grows by the mass the removed ones had. The
  Qwen2-MoE shared expert (sigmoid-gated) is untouched.
- DeepSeek-V2: softmax over the remaining experts, top-k by `topk_method` ("greedy", or
  "group_limited_greedy": the `topk_group` groups with the highest best score, then top-k inside them),
  weights times `routed_scaling_factor`, not renormalised. Groups are consecutive runs of E/n_group
  experts, so a group-limited cut must remove as many experts from every group (`n_group` stays).
- DeepSeek-V3: each expert's score is a sigmoid of its own logit (independent of the others, so unchanged);
  experts are CHOSEN by score + `e_score_correction_bias` (sliced with the router) among the `topk_group`
  groups with the highest sum of their two best choice scores, then weighted by the plain scores,
  renormalised with `norm_topk_prob`, times `routed_scaling_factor`. A cut must remove as many experts from
  every group and leave each group at least two (the group score takes two), so `n_group` stays. (The
  minus-infinity reference must mask the correction bias too: a removed expert with logit -inf still
  scores sigmoid(-inf) + bias = bias.)
- GPT-OSS: top-k on the logits (router bias included), softmax over the k chosen; kept experts' logits are
  unchanged, so a token routes as before unless a removed expert was in its top-k. The router bias rows and
  the experts' `gate_up_proj_bias` / `down_proj_bias` go with their experts.
- Granite-MoE: top-k on the logits, softmax over the k chosen (GPT-OSS without biases).

Every family holds one expert count for all MoE layers in its config, so a cut must leave every MoE layer
with the same number of experts, and at least `num_experts_per_tok`.
"""

from __future__ import annotations

from layerprune.errors import LayerpruneError
from layerprune.models.experts.anatomy import MoeSpec, register_moe_family

_SOFTMAX_TOPK_RENORM = "softmax over the remaining experts, top-k, the k weights renormalised"
_SOFTMAX_TOPK = "softmax over the remaining experts, then top-k (renormalised only with norm_topk_prob)"
_TOPK_SOFTMAX = "top-k on the remaining experts' logits, softmax over the k chosen"


def check_even_groups(config, kept: dict[int, list[int]], *, min_per_group: int, what: str) -> None:
    """Group-limited routing: every group keeps the same number of experts, at least `min_per_group`, and the
    `topk_group` chosen groups hold at least `num_experts_per_tok` experts. `kept`: layer -> kept positions
    among the current experts (groups are consecutive runs of E / n_group of them)."""
    n_group, topk_group, top_k = config.n_group or 1, config.topk_group or 1, config.num_experts_per_tok
    n_experts = config.n_routed_experts
    if n_experts % n_group:
        raise LayerpruneError(f"{what}: n_routed_experts {n_experts} is not a multiple of n_group {n_group}")
    size = n_experts // n_group
    for layer, positions in kept.items():
        counts = [sum(1 for p in positions if p // size == g) for g in range(n_group)]
        if len(set(counts)) != 1:
            raise LayerpruneError(
                f"{what} routes within {n_group} groups of {size} experts: remove as many experts from every "
                f"group (layer {layer} would keep {counts} per group)"
            )
        if counts[0] < min_per_group or counts[0] * topk_group < top_k:
            raise LayerpruneError(
                f"{what} group-limited routing needs at least {min_per_group} experts per group and "
                f"topk_group ({topk_group}) x experts per group >= num_experts_per_tok ({top_k}); layer {layer} "
                f"would keep {counts[0]} per group"
            )


def _deepseek_v2_group_limited(config) -> bool:
    return getattr(config, "topk_method", "greedy") == "group_limited_greedy"


def _deepseek_v2_groups(config, kept: dict[int, list[int]]) -> None:
    if _deepseek_v2_group_limited(config):
        check_even_groups(config, kept, min_per_group=1, what="DeepSeek-V2 (topk_method group_limited_greedy)")


def _deepseek_v2_group_count(config) -> int:
    return (config.n_group or 1) if _deepseek_v2_group_limited(config) else 1


def _deepseek_v3_group_count(config) -> int:
    return config.n_group or 1


def _deepseek_v3_groups(config, kept: dict[int, list[int]]) -> None:
    check_even_groups(config, kept, min_per_group=2, what="DeepSeek-V3")


register_moe_family(MoeSpec("mixtral", "num_local_experts", routing=_SOFTMAX_TOPK_RENORM), ["mixtral"])
register_moe_family(
    MoeSpec("qwen-moe", "num_experts", routing=_SOFTMAX_TOPK + "; the shared expert is untouched"),
    ["qwen2_moe", "qwen3_moe"],
)
register_moe_family(MoeSpec("olmoe", "num_experts", routing=_SOFTMAX_TOPK), ["olmoe"])
register_moe_family(
    MoeSpec(
        "deepseek-v2", "n_routed_experts", check_cut=_deepseek_v2_groups, groups=_deepseek_v2_group_count,
        routing="softmax over the remaining experts, top-k (greedy or group-limited, groups cut evenly), "
        "times routed_scaling_factor; shared experts untouched",
    ),
    ["deepseek_v2"],
)
register_moe_family(
    MoeSpec(
        "deepseek-v3", "n_routed_experts", check_cut=_deepseek_v3_groups, groups=_deepseek_v3_group_count,
        routing="sigmoid scores (unchanged), chosen with the sliced e_score_correction_bias within the best "
        "topk_group groups (groups cut evenly, n_group kept), norm_topk_prob, routed_scaling_factor; "
        "shared experts untouched",
    ),
    ["deepseek_v3"],
)
register_moe_family(
    MoeSpec("gpt-oss", "num_local_experts", router="router",
            routing=_TOPK_SOFTMAX + " (router bias and expert biases sliced with their experts)"),
    ["gpt_oss"],
)
register_moe_family(
    MoeSpec("granite-moe", "num_local_experts", block="block_sparse_moe", router="router", routing=_TOPK_SOFTMAX),
    ["granitemoe"],
)
