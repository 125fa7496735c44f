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


def block_inputs(model, ids, mask):
    """The hidden states entering every MoE block (a pre-hook on the stock block), [B, S, H] per layer."""
    captured, handles = {}, []
    for i, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            handles.append(layer.mlp.register_forward_pre_hook(lambda m, args, i=i: captured.__setitem__(i, args[0])))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, use_cache=False)
    for handle in handles:
        handle.remove()
    return captured


def hand_scores(model, ids, mask, renormalise: bool) -> dict[int, dict[str, list[float]]]:
    """Router probabilities and expert outputs written out: softmax, top-k, (renormalise), SwiGLU experts."""
    top_k = model.config.num_experts_per_tok
    real = mask.reshape(-1).bool()
    out = {}
    for i, x in block_inputs(model, ids, mask).items():
        block = model.model.layers[i].mlp
        x = x.reshape(-1, x.shape[-1])[real].double()
        probs = F.softmax(x @ block.gate.weight.double().T, dim=-1)
        top, chosen = probs.topk(top_k, dim=-1)
        if renormalise:
            top = top / top.sum(-1, keepdim=True)
        n = x.shape[0]
        scores = {name: [0.0] * N_EXPERTS for name in CALIBRATED}
        for j in range(N_EXPERTS):
            rows, slots = (chosen == j).nonzero(as_tuple=True)
            gate_up = x[rows] @ block.experts.gate_up_proj[j].double().T
            gate, up = gate_up.chunk(2, dim=-1)
            f = (F.silu(gate) * up) @ block.experts.down_proj[j].double().T
            norms, g = f.norm(dim=-1), top[rows, slots]
            scores["frequency"][j] = len(rows) / n
            scores["soft-count"][j] = float(g.detach().sum()) / n
            scores["reap"][j] = float((g * norms).detach().sum()) / len(rows) if len(rows) else 0.0
            scores["activation-norm"][j] = float(norms.detach().sum()) / n
        out[i] = scores
    return out


@pytest.mark.parametrize(("family", "renormalise"), [("mixtral", True), ("qwen2_moe", False), ("qwen3_moe", True)])
def test_scores_equal_hand_computation(family, renormalise):
    model = tiny_moe_model(family)
    ids, mask = padded_batch()
    scores = compute_expert_scores(model, {name: {} for name in CALIBRATED}, calib(ids, mask), batch_size=1)
    expected = hand_scores(model, ids, mask, renormalise)
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
    # The same real tokens without padding: row 1 alone, cut to its 5 real tokens, and row 0.
    trimmed = {name: [] for name in CALIBRATED}
    alone = [compute_expert_scores(model, {n: {} for n in CALIBRATED}, calib(row)) for row in (ids[:1], ids[1:, :5])]
    for name in CALIBRATED:
        for k, layer in enumerate(padded[name].layers):
            a, b = (torch.tensor(s[name].values[k], dtype=torch.float64) for s in alone)
            if name == "reap":  # a mean over routed tokens: weight each part by its routed count
                ca, cb = (torch.tensor(s["frequency"].values[k], dtype=torch.float64) * t for s, t in zip(alone, (12, 5)))
                combined = torch.where(ca + cb > 0, (a * ca + b * cb) / (ca + cb).clamp_min(1), 0.0)
            else:
                combined = (a * 12 + b * 5) / 17
            trimmed[name].append(combined.tolist())
        for got, want in zip(padded[name].values, trimmed[name]):
            assert got == pytest.approx(want, rel=1e-5, abs=1e-9), name
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
