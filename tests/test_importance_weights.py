"""Weight metrics (magnitude-l1/-l2, taylor) against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import FAMILIES, N_LAYERS, tiny_input, tiny_model

from layerprune.data.calibration import CalibrationData
from layerprune.errors import LayerpruneError
from layerprune.importance import compute_scores
from layerprune.importance.weights import lm_labels
from layerprune.models.anatomy import get_anatomy

LLAMA_MATRICES = [
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
]
LLAMA_NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]


def calib(ids: torch.Tensor, mask: torch.Tensor | None = None) -> CalibrationData:
    mask = torch.ones_like(ids) if mask is None else mask
    return CalibrationData(ids, mask, description={"source": "test", "n_samples": ids.shape[0]})


def block_param(model, layer: int, name: str) -> torch.Tensor:
    return get_anatomy(model).layers[layer].get_parameter(name)


def padded_calibration() -> CalibrationData:
    ids = tiny_input(batch=3, length=10)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 8:] = 0
    ids[1, 6:] = 95  # garbage under the padding
    ids[2, 8:] = 4
    return calib(ids, mask)


def reference_taylor(model, data: CalibrationData, names_of_block) -> list[float]:
    """Plain autograd: one backward of the mean token loss, then Σ|grad * w| per block."""
    labels = data.input_ids.masked_fill(data.attention_mask == 0, -100)
    model.zero_grad()
    loss = model(input_ids=data.input_ids, attention_mask=data.attention_mask, labels=labels).loss
    loss.backward()
    scores = []
    for i, block in enumerate(get_anatomy(model).layers):
        chosen = [p for n, p in block.named_parameters() if n in names_of_block(i)]
        scores.append(sum(float((p.grad * p.detach()).abs().sum()) for p in chosen))
    model.zero_grad(set_to_none=True)
    return scores


# ---------------------------------------------------------------------------------------------
# magnitude
# ---------------------------------------------------------------------------------------------


def test_magnitude_equals_sum_of_norms_by_hand():
    model = tiny_model("llama")
    l1 = compute_scores(model, "magnitude-l1").values
    l2 = compute_scores(model, "magnitude-l2").values
    for i in range(N_LAYERS):
        mats = [block_param(model, i, name).detach().double() for name in LLAMA_MATRICES]
        assert l1[i] == pytest.approx(sum(float(w.abs().sum()) for w in mats), rel=1e-9)
        assert l2[i] == pytest.approx(sum(float(torch.linalg.matrix_norm(w, "fro")) for w in mats), rel=1e-9)


def test_magnitude_include_norms_adds_the_norm_scales():
    model = tiny_model("llama")
    base = compute_scores(model, "magnitude-l1").values
    with_norms = compute_scores(model, "magnitude-l1", include_norms=True).values
    for i in range(N_LAYERS):
        extra = sum(float(block_param(model, i, n).detach().double().abs().sum()) for n in LLAMA_NORMS)
        assert with_norms[i] == pytest.approx(base[i] + extra, rel=1e-9)


def test_magnitude_excludes_biases_and_norms_on_gpt2():
    model = tiny_model("gpt2")
    names = ["attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"]
    l1 = compute_scores(model, "magnitude-l1").values
    for i in range(N_LAYERS):
        assert l1[i] == pytest.approx(sum(float(block_param(model, i, n).detach().abs().sum()) for n in names))


def test_magnitude_l2_counts_each_stacked_expert_as_a_matrix():
    model = tiny_model("mixtral")
    l2 = compute_scores(model, "magnitude-l2").values
    block = get_anatomy(model).layers[1]
    expected = 0.0
    for name, p in block.named_parameters():
        if p.ndim == 2:
            expected += float(torch.linalg.matrix_norm(p.detach().double()))
        elif p.ndim == 3:  # [experts, out, in]
            expected += sum(float(torch.linalg.matrix_norm(p[e].detach().double())) for e in range(p.shape[0]))
    assert l2[1] == pytest.approx(expected, rel=1e-9)


def test_magnitude_follows_the_weights():
    model = tiny_model("llama")
    before = compute_scores(model, "magnitude-l2").values
    with torch.no_grad():
        for name in LLAMA_MATRICES:
            block_param(model, 3, name).mul_(2.0)
    after = compute_scores(model, "magnitude-l2").values
    assert after[3] == pytest.approx(2 * before[3], rel=1e-9)
    assert [after[i] for i in (0, 1, 2, 4)] == [before[i] for i in (0, 1, 2, 4)]


# ---------------------------------------------------------------------------------------------
# taylor
# ---------------------------------------------------------------------------------------------


def test_taylor_equals_plain_autograd():
    model = tiny_model("llama")
    data = calib(tiny_input(batch=2, length=10))
    expected = reference_taylor(model, data, lambda i: LLAMA_MATRICES)
    got = compute_scores(model, "taylor", data).values
    assert got == pytest.approx(expected, rel=1e-5)
    assert all(v > 0 for v in got)


def test_taylor_with_padding_and_norms_equals_plain_autograd():
    model = tiny_model("llama")
    data = padded_calibration()
    expected = reference_taylor(model, data, lambda i: LLAMA_MATRICES + LLAMA_NORMS)
    got = compute_scores(model, "taylor", data, include_norms=True).values
    assert got == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_taylor_small_batches_give_the_gradient_of_the_total_loss(batch_size):
    model = tiny_model("llama")
    data = padded_calibration()
    whole = compute_scores(model, "taylor", data).values
    batched = compute_scores(model, "taylor", data, batch_size=batch_size).values
    assert batched == pytest.approx(whole, rel=1e-5)


def test_taylor_frees_each_gradient_as_soon_as_it_is_reduced(monkeypatch):
    """One batch: when a weight's |g * w| is reduced, no other weight still holds a gradient."""
    import layerprune.importance.weights as weights

    model = tiny_model("llama")
    live = []
    original = weights.taylor_saliency

    def spy(param):
        live.append(sum(p.grad is not None for p in model.parameters()))
        return original(param)

    monkeypatch.setattr(weights, "taylor_saliency", spy)
    compute_scores(model, "taylor", calib(tiny_input(batch=2, length=8)))
    assert len(live) == N_LAYERS * len(LLAMA_MATRICES)
    assert max(live) == 1


def test_taylor_restores_flags_grads_and_mode():
    model = tiny_model("llama")
    data = calib(tiny_input(batch=2, length=8))
    expected = reference_taylor(model, data, lambda i: LLAMA_MATRICES)

    model.train()
    get_anatomy(model).embeddings.weight.requires_grad_(False)
    block_param(model, 0, "self_attn.q_proj.weight").requires_grad_(False)
    up = block_param(model, 1, "mlp.up_proj.weight")
    sentinel = torch.full_like(up, 7.0)
    up.grad = sentinel
    flags = {n: p.requires_grad for n, p in model.named_parameters()}

    got = compute_scores(model, "taylor", data).values

    # Frozen weights are still scored, and a user's existing .grad neither leaks in nor is lost.
    assert got == pytest.approx(expected, rel=1e-5)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert up.grad is sentinel and bool((sentinel == 7.0).all())
    assert all(p.grad is None for p in model.parameters() if p is not up)
    assert model.training


def test_taylor_never_asks_gradients_of_embeddings_or_head():
    model = tiny_model("gemma2")  # tied embeddings
    anatomy = get_anatomy(model)
    seen = []
    handles = [
        p.register_post_accumulate_grad_hook(lambda p: seen.append(p))
        for p in list(anatomy.embeddings.parameters()) + list(anatomy.lm_head.parameters())
    ]
    compute_scores(model, "taylor", calib(tiny_input(batch=2, length=8)))
    for handle in handles:
        handle.remove()
    assert seen == []
    assert anatomy.embeddings.weight.grad is None and anatomy.embeddings.weight.requires_grad


def test_lm_labels_ignore_padding_and_tokens_after_left_padding():
    ids = torch.tensor([[5, 6, 7, 8], [9, 9, 5, 6]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1]])
    assert lm_labels(ids, mask).tolist() == [[5, 6, 7, -100], [-100, -100, -100, 6]]


def test_taylor_needs_tokens_to_predict():
    ids = tiny_input(batch=2, length=4)
    mask = torch.zeros_like(ids)
    mask[:, 0] = 1
    with pytest.raises(LayerpruneError, match="no token to predict"):
        compute_scores(tiny_model("llama"), "taylor", calib(ids, mask))


@pytest.mark.parametrize("family", FAMILIES)
def test_taylor_and_magnitude_on_every_family(family):
    model = tiny_model(family)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    n = get_anatomy(model).num_layers
    for metric in ("magnitude-l1", "magnitude-l2", "taylor"):
        values = compute_scores(model, metric, padded_calibration()).values
        assert len(values) == n and all(math.isfinite(v) and v > 0 for v in values), metric
    assert {k: p.requires_grad for k, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
