"""Expert metrics (frequency, soft count, REAP, activation norm, random) against hand computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layerprune.data.calibration import CalibrationData
from layerprune.errors import LayerpruneError
from layerprune.importance.experts.registry import available_expert_metrics, compute_expert_scores
from layerprune.models.experts.surgery import remove_experts
from tiny_models import MOE_FAMILIES, N_EXPERTS, tiny_input, tiny_model, tiny_moe_model

CALIBRATED = ["frequency", "soft-count", "reap", "activation-norm"]


def calib(ids, mask=None):
    mask = torch.ones_like(ids) if mask is None else mask
    return CalibrationData(ids, mask, description={"source": "test"})


def padded_batch():
    """Two rows of 12 tokens; the second has 5 real tokens followed by garbage marked as padding."""
    ids = tiny_input(batch=2, length=12, seed=3)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return ids, mask


def moe_block(layer):
    return getattr(layer, "block_sparse_moe", None) or layer.mlp


def block_inputs(model, ids, mask):
    """The hidden states entering every MoE block (a pre-hook on the stock block), [B, S, H] per layer."""
    captured, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        if hasattr(moe_block(layer), "experts"):
            hook = lambda m, args, i=i: captured.__setitem__(i, args[0])  # noqa: E731
            handles.append(moe_block(layer).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for handle in handles:
        handle.remove()
    return captured


# Each family's router, written out: x [T, H] (float64) -> (gate values [T, k], chosen experts [T, k]).
def softmax_topk(block, x, config, renormalise):
    top, chosen = F.softmax(x @ block.gate.weight.double().T, dim=-1).topk(config.num_experts_per_tok, dim=-1)
    return (top / top.sum(-1, keepdim=True) if renormalise else top), chosen


def topk_softmax(router, x, config):
    logits = x @ router.weight.double().T + (router.bias.double() if getattr(router, "bias", None) is not None else 0)
    top, chosen = logits.topk(config.num_experts_per_tok, dim=-1)
    return F.softmax(top, dim=-1), chosen


def deepseek_v3_router(block, x, config):
    scores = torch.sigmoid(x @ block.gate.weight.double().T)
    choice = scores + block.gate.e_score_correction_bias.double()
    groups = choice.view(-1, config.n_group, N_EXPERTS // config.n_group)
    best_groups = groups.topk(2, dim=-1).values.sum(-1).topk(config.topk_group, dim=-1).indices
    allowed = torch.zeros_like(groups[..., 0]).scatter(1, best_groups, 1.0).bool()
    choice = choice.masked_fill(~allowed.repeat_interleave(N_EXPERTS // config.n_group, dim=1), float("-inf"))
    chosen = choice.topk(config.num_experts_per_tok, dim=-1).indices
    weights = scores.gather(1, chosen)
    return weights / (weights.sum(-1, keepdim=True) + 1e-20) * config.routed_scaling_factor, chosen


ROUTERS = {
    "mixtral": lambda block, x, c: softmax_topk(block, x, c, True),
    "qwen2_moe": lambda block, x, c: softmax_topk(block, x, c, False),  # norm_topk_prob False
    "qwen3_moe": lambda block, x, c: softmax_topk(block, x, c, True),  # norm_topk_prob True
    "granitemoe": lambda block, x, c: topk_softmax(block.router, x, c),
    "gpt_oss": lambda block, x, c: topk_softmax(block.router, x, c),  # with the router bias
    "deepseek_v3": deepseek_v3_router,
}


def swiglu_expert(experts, j, x):
    gate, up = (x @ experts.gate_up_proj[j].double().T).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ experts.down_proj[j].double().T


def gpt_oss_expert(experts, j, x):
    """Interleaved gate/up, biases, clamped SwiGLU with alpha and (up + 1)."""
    gate_up = x @ experts.gate_up_proj[j].double() + experts.gate_up_proj_bias[j].double()
    gate, up = gate_up[..., ::2].clamp(max=experts.limit), gate_up[..., 1::2].clamp(-experts.limit, experts.limit)
    glu = gate * torch.sigmoid(gate * experts.alpha)
    return ((up + 1) * glu) @ experts.down_proj[j].double() + experts.down_proj_bias[j].double()


def hand_scores(model, ids, mask, family) -> dict[int, dict[str, list[float]]]:
    """Router probabilities and expert outputs written out per family; real tokens only."""
    real = mask.reshape(-1).bool()
    expert_fn = gpt_oss_expert if family == "gpt_oss" else swiglu_expert
    out = {}
    for i, x in block_inputs(model, ids, mask).items():
        block = moe_block(model.model.layers[i])
        x = x.reshape(-1, x.shape[-1])[real].double().detach()
        top, chosen = ROUTERS[family](block, x, model.config)
        n = x.shape[0]
        scores = {name: [0.0] * N_EXPERTS for name in CALIBRATED}
        for j in range(N_EXPERTS):
            rows, slots = (chosen == j).nonzero(as_tuple=True)
            norms, g = expert_fn(block.experts, j, x[rows]).detach().norm(dim=-1), top[rows, slots].detach()
            scores["frequency"][j] = len(rows) / n
            scores["soft-count"][j] = float(g.sum()) / n
            scores["reap"][j] = float((g * norms).sum()) / len(rows) if len(rows) else 0.0
            scores["activation-norm"][j] = float(norms.sum()) / n
        out[i] = scores
    return out


@pytest.mark.parametrize("family", list(ROUTERS))
def test_scores_equal_hand_computation(family):
    model = tiny_moe_model(family)
    ids, mask = padded_batch()
    scores = compute_expert_scores(model, {name: {} for name in CALIBRATED}, calib(ids, mask), batch_size=1)
    expected = hand_scores(model, ids, mask, family)
    for name in CALIBRATED:
        assert scores[name].layers == sorted(expected)
        for layer, values in zip(scores[name].layers, scores[name].values):
            assert values == pytest.approx(expected[layer][name], rel=1e-5, abs=1e-9), (name, layer)
    assert scores["frequency"].extra["tokens"] == {str(layer): 12 + 5 for layer in expected}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_family_is_scored_and_padding_never_counts(family):
    model = tiny_moe_model(family)
    ids, mask = padded_batch()
    padded = compute_expert_scores(model, {name: {} for name in CALIBRATED}, calib(ids, mask), batch_size=2)
    # The same real tokens without padding: row 0, and row 1 cut to its 5 real tokens, scored apart.
    alone = [compute_expert_scores(model, {n: {} for n in CALIBRATED}, calib(row)) for row in (ids[:1], ids[1:, :5])]
    for name in CALIBRATED:
        for k, got in enumerate(padded[name].values):
            a, b = (torch.tensor(s[name].values[k], dtype=torch.float64) for s in alone)
            if name == "reap":  # a mean over routed tokens: weight each part by its routed count
                ca, cb = (torch.tensor(s["frequency"].values[k], dtype=torch.float64) * t for s, t in zip(alone, (12, 5)))
                want = torch.where(ca + cb > 0, (a * ca + b * cb) / (ca + cb).clamp_min(1), 0.0)
            else:
                want = (a * 12 + b * 5) / 17
            assert got == pytest.approx(want.tolist(), rel=1e-5, abs=1e-9), name
    top_k = model.config.num_experts_per_tok
    for values in padded["frequency"].values:
        assert sum(values) == pytest.approx(top_k) and len(values) == N_EXPERTS


def test_scores_speak_original_expert_indices_after_a_cut():
    model = tiny_moe_model("mixtral")
    remove_experts(model, {0: [1, 6], 1: [0, 7]})
    scores = compute_expert_scores(model, "reap", calib(tiny_input()))
    assert scores.experts == [[0, 2, 3, 4, 5, 7], [1, 2, 3, 4, 5, 6]]
    assert set(scores.as_dict()[0]) == {0, 2, 3, 4, 5, 7}


def test_random_is_seeded_and_needs_no_calibration():
    model = tiny_moe_model("olmoe")
    a = compute_expert_scores(model, {"random": {"seed": 3}})["random"]
    b = compute_expert_scores(model, {"random": {"seed": 3}})["random"]
    c = compute_expert_scores(model, {"random": {"seed": 4}})["random"]
    assert a.values == b.values != c.values and a.values[0] != a.values[1]
    assert a.calibration is None


def test_errors_are_one_line():
    assert set(CALIBRATED + ["random"]) <= set(available_expert_metrics())
    with pytest.raises(LayerpruneError, match="need calibration"):
        compute_expert_scores(tiny_moe_model("mixtral"), "reap")
    with pytest.raises(LayerpruneError, match="unknown expert metric"):
        compute_expert_scores(tiny_moe_model("mixtral"), "nope", calib(tiny_input()))
    with pytest.raises(LayerpruneError, match="not a supported mixture-of-experts"):
        compute_expert_scores(tiny_model("llama"), "frequency", calib(tiny_input()))
