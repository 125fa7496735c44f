"""Removing experts is exact and stock, for every MoE family transformers has: logits equal the unpruned model
with the removed experts' router logits at minus infinity, and the saved folder reloads with stock transformers."""

import json
from contextlib import contextmanager

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune import LayerpruneError, bypass_layers, remove_layers, save_model
from layerprune.models.experts.anatomy import experts_per_layer
from layerprune.models.experts.surgery import remove_experts
from tiny_models import MOE_FAMILIES, N_EXPERTS, tiny_input, tiny_model, tiny_moe_model

# Where each family's router sits inside a decoder layer, written out here (not taken from layerprune).
ROUTER = {"gpt_oss": "mlp.router", "granitemoe": "block_sparse_moe.router"}


def moe_layer_indices(model):
    return [i for i, layer in enumerate(model.model.layers) if _router(model, i) is not None]


def _router(model, i):
    module = model.model.layers[i]
    for part in ROUTER.get(model.config.model_type, "mlp.gate").split("."):
        module = getattr(module, part, None)
    return module if module is not None and hasattr(module, "weight") and module.weight.ndim == 2 else None


def cut_for(model):
    """One expert from each half of the experts (each DeepSeek group), different ones per MoE layer."""
    layers = moe_layer_indices(model)
    return {layer: [1 + k, N_EXPERTS - 2 - k] for k, layer in enumerate(layers)}


@contextmanager
def masked_router_logits(model, removed: dict[int, list[int]]):
    """The reference: the unpruned model with the removed experts' router logits set to -inf before any
    softmax / sigmoid / top-k. Every router computes its logits as F.linear(hidden, router.weight[, bias]), so
    the patched F.linear masks the columns of calls made with a router's weight (the router bias, GPT-OSS, is
    inside). DeepSeek-V3 chooses experts by sigmoid(logit) + e_score_correction_bias: a removed expert would
    still score its bias, so its bias is set to -inf as well (restored on exit)."""
    columns = {_router(model, layer).weight.data_ptr(): experts for layer, experts in removed.items()}
    original = torch.nn.functional.linear
    saved_biases = []

    def linear(input, weight, bias=None):
        out = original(input, weight, bias)
        masked = columns.get(weight.data_ptr())
        if masked is not None and weight.shape[0] == N_EXPERTS:
            out = out.clone()
            out[..., masked] = float("-inf")
        return out

    for layer, experts in removed.items():
        bias = getattr(_router(model, layer), "e_score_correction_bias", None)
        if bias is not None:
            saved_biases.append((bias, bias.clone()))
            bias[experts] = float("-inf")
    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original
        for bias, value in saved_biases:
            bias.copy_(value)


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_pruned_logits_equal_masked_router_reference(family):
    model = tiny_moe_model(family)
    ids = tiny_input()
    cut = cut_for(model)
    with masked_router_logits(model, cut):
        reference = logits(model, ids)
    unpruned = logits(model, ids)
    assert not torch.allclose(reference, unpruned, atol=1e-4), "masking the experts must change the output"
    remove_experts(model, cut, how={"chosen_by": "explicit"})
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-6)
    assert experts_per_layer(model) == {layer: N_EXPERTS - 2 for layer in cut}
    for layer in cut:
        assert _router(model, layer).weight.shape[0] == N_EXPERTS - 2
    record = model.config.layerprune["experts"]
    assert record["original_num_experts"] == N_EXPERTS
    assert record["dropped"] == {str(layer): experts for layer, experts in cut.items()}
    assert record["kept"] == {str(k): [e for e in range(N_EXPERTS) if e not in v] for k, v in cut.items()}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_saved_model_reloads_with_stock_transformers(family, tmp_path):
    model = tiny_moe_model(family)
    ids = tiny_input()
    remove_experts(model, cut_for(model))
    expected = logits(model, ids)
    save_model(model, None, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert type(reloaded) is type(model)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-6)
    assert experts_per_layer(reloaded) == experts_per_layer(model)
    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    assert config["layerprune"]["experts"] == model.config.layerprune["experts"]
    record = json.loads((tmp_path / "pruned" / "layerprune.json").read_text())
    assert record["experts"]["dropped"] == {str(k): v for k, v in cut_for(model).items()}


def test_a_second_cut_speaks_original_indices():
    once, twice = tiny_moe_model("mixtral"), tiny_moe_model("mixtral")
    ids = tiny_input()
    remove_experts(once, {0: [1, 2, 5, 6], 1: [0, 3, 4, 7]})
    remove_experts(twice, {0: [1, 6], 1: [0, 7]})
    remove_experts(twice, {0: [2, 5], 1: [3, 4]})
    torch.testing.assert_close(logits(twice, ids), logits(once, ids), rtol=1e-6, atol=1e-7)
    assert twice.config.layerprune["experts"] == once.config.layerprune["experts"]
    assert [step["dropped_experts"] for step in twice.config.layerprune["history"]] == [
        {"0": [1, 6], "1": [0, 7]}, {"0": [2, 5], "1": [3, 4]},
    ]
    with pytest.raises(LayerpruneError, match="already removed"):
        remove_experts(twice, {0: [1], 1: [2]})


def test_layer_removal_keeps_the_expert_record():
    model = tiny_moe_model("qwen2_moe")
    remove_experts(model, {0: [1, 6], 2: [2, 5]})
    remove_layers(model, [0])
    record = model.config.layerprune
    assert record["kept_layers"] == [1, 2]
    assert record["experts"]["dropped"] == {"2": [2, 5]}
    remove_experts(model, {2: [0]})  # original indices still, after renumbering
    assert experts_per_layer(model) == {2: N_EXPERTS - 3}


REFUSALS = [
    ({0: [1, 2], 1: [1]}, "every MoE layer must keep as many"),
    ({0: [1, 2]}, "every MoE layer must keep as many"),
    ({0: list(range(7)), 1: list(range(7))}, "num_experts_per_tok=2"),
    ({0: [8], 1: [1]}, "out of range"),
    ({0: [-1], 1: [1]}, "out of range"),
    ({0: [1, 1], 1: [1, 2]}, "duplicate expert"),
    ({0: [1.0], 1: [1]}, "must be integers"),
    ({5: [1]}, "out of range"),
    ({}, "no experts"),
]


@pytest.mark.parametrize(("cut", "message"), REFUSALS)
def test_bad_cuts_are_refused_and_change_nothing(cut, message):
    model = tiny_moe_model("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LayerpruneError, match=message):
        remove_experts(model, cut)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert model.config.num_local_experts == N_EXPERTS and "layerprune" not in model.config.to_dict()


def test_dense_models_and_dense_layers_are_refused():
    with pytest.raises(LayerpruneError, match="not a supported mixture-of-experts"):
        remove_experts(tiny_model("llama"), {0: [1]})
    with pytest.raises(LayerpruneError, match=r"layers \[1\] have no mixture-of-experts block"):
        remove_experts(tiny_moe_model("qwen2_moe"), {0: [1], 1: [1], 2: [1]})


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_group_limited_routing_needs_even_groups(family):
    model = tiny_moe_model(family)  # 2 groups of 4 experts
    with pytest.raises(LayerpruneError, match="as many experts from every group"):
        remove_experts(model, {0: [0, 1], 1: [0, 1]})
    remove_experts(model, {0: [0, 4], 1: [3, 7]})  # one from each group: n_group stays 2
    assert model.config.n_routed_experts == 6 and model.config.n_group == 2


def test_deepseek_v3_groups_keep_two_experts():
    model = tiny_moe_model("deepseek_v3")
    with pytest.raises(LayerpruneError, match="at least 2 experts per group"):
        remove_experts(model, {0: [0, 1, 2, 4, 5, 6], 1: [1, 2, 3, 5, 6, 7]})  # one per group left


def test_deepseek_v2_greedy_routing_has_no_group_constraint():
    model = tiny_moe_model("deepseek_v2", topk_method="greedy", n_group=None, topk_group=None)
    remove_experts(model, {0: [0, 1], 1: [2, 3]})
    assert model.config.n_routed_experts == 6


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_greedy_generation_with_cache_matches_full_forward(family):
    model = tiny_moe_model(family)
    remove_experts(model, cut_for(model))
    prompt = tiny_input(batch=1, length=8)
    with torch.no_grad():
        generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                   min_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    ids = prompt
    for _ in range(5):
        ids = torch.cat([ids, logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_layers_then_experts_reload_stock(family, tmp_path):
    """Three layers (DeepSeek: the first dense, first_k_dense_replace=1); layer 0 goes, then experts."""
    overrides = {} if family == "qwen2_moe" else {"num_hidden_layers": 3}
    if family.startswith("deepseek"):
        overrides["first_k_dense_replace"] = 1
    if family == "gpt_oss":
        overrides["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    model = tiny_moe_model(family, **overrides)
    ids = tiny_input()
    with bypass_layers(model, [0]):
        reference = logits(model, ids)
    remove_layers(model, [0])
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-6)
    remove_experts(model, {layer: [1, N_EXPERTS - 2] for layer in experts_per_layer(model)})
    expected = logits(model, ids)
    save_model(model, None, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-6)
    assert experts_per_layer(reloaded) == experts_per_layer(model) == {
        layer: N_EXPERTS - 2 for layer in ((2,) if family == "qwen2_moe" else (1, 2))}  # qwen2_moe: 1 is dense
