"""Removing layers keeps every invariant, for every family: logits, KV cache, reload, config."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune import LayerpruneError, bypass_layers, get_anatomy, kept_layers, remove_layers, save_model
from layerprune.models.anatomy import count_parameters
from layerprune.models.surgery import untie_embeddings
from tiny_models import FAMILIES, N_LAYERS, tiny_input, tiny_model

DROP = [2, N_LAYERS - 1]  # a middle layer and the last one


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_logits_equal_bypass_reference(family):
    model = tiny_model(family)
    ids = tiny_input()
    with bypass_layers(model, DROP):
        reference = logits(model, ids)
    unpruned = logits(model, ids)
    remove_layers(model, DROP)
    pruned = logits(model, ids)
    torch.testing.assert_close(pruned, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(pruned, unpruned, atol=1e-3), "removing layers must change the output"
    assert get_anatomy(model).num_layers == N_LAYERS - len(DROP)
    assert kept_layers(model) == [i for i in range(N_LAYERS) if i not in DROP]


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_cache_matches_full_forward(family):
    model = tiny_model(family)
    remove_layers(model, DROP)
    prompt = tiny_input(batch=1, length=10)
    with torch.no_grad():
        generated = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
            min_new_tokens=6, use_cache=True, pad_token_id=0,
        )
    ids = prompt
    for _ in range(6):
        next_token = logits(model, ids)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_token], dim=1)
    assert torch.equal(generated, ids)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_model_reloads_with_stock_transformers(family, tmp_path):
    model = tiny_model(family)
    ids = tiny_input()
    remove_layers(model, DROP, how={"chosen_by": "explicit"})
    expected = logits(model, ids)
    save_model(model, None, tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert type(reloaded) is type(model)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)

    config = json.loads((tmp_path / "pruned" / "config.json").read_text())
    n_key = "n_layer" if family == "gpt2" else "num_hidden_layers"
    assert config[n_key] == N_LAYERS - len(DROP)
    for key, value in config.items():
        if isinstance(value, list) and key not in ("architectures", "kept_layers", "mlp_only_layers"):
            assert len(value) != N_LAYERS, f"per-layer list {key} still has an entry for removed layers"
    assert config["layerprune"]["kept_layers"] == [0, 1, 3]
    record = json.loads((tmp_path / "pruned" / "layerprune.json").read_text())
    assert record["dropped_layers"] == DROP and record["original_num_layers"] == N_LAYERS
    assert "transformers" in record["versions"]


def test_per_layer_config_lists_follow_the_kept_layers():
    model = tiny_model("gemma3_text")
    types = list(model.config.layer_types)
    remove_layers(model, [1, 4])
    assert model.config.layer_types == [types[0], types[2], types[3]]


def test_qwen2_window_threshold_is_rewritten():
    model = tiny_model("qwen2")  # max_window_layers=2: layers 0,1 full, 2.. sliding
    remove_layers(model, [0])
    assert model.config.max_window_layers == 1
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]


def test_moe_layout_survives_renumbering(tmp_path):
    # decoder_sparse_step=2 and mlp_only_layers=[4]: only layers 1 and 3 are sparse.
    model = tiny_model("qwen3_moe")
    sparse_before = [type(block.mlp).__name__ for block in get_anatomy(model).layers]
    remove_layers(model, [0])
    sparse_after = [type(block.mlp).__name__ for block in get_anatomy(model).layers]
    assert sparse_after == sparse_before[1:]
    save_model(model, None, tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert [type(b.mlp).__name__ for b in get_anatomy(reloaded).layers] == sparse_after


def test_second_prune_speaks_original_indices(tmp_path):
    model = tiny_model("llama")
    ids = tiny_input()
    with bypass_layers(model, [1, 3]):
        reference = logits(model, ids)
    remove_layers(model, [1])
    save_model(model, None, tmp_path / "once")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "once").eval()
    remove_layers(again, [3])
    assert kept_layers(again) == [0, 2, 4]
    assert again.config.layerprune["dropped_layers"] == [1, 3]
    torch.testing.assert_close(logits(again, ids), reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(LayerpruneError, match="already removed"):
        remove_layers(again, [1])


@pytest.mark.parametrize(
    "drop, message",
    [([N_LAYERS], "out of range"), ([-1], "out of range"), ([1, 1], "duplicate"), (list(range(N_LAYERS)), "cannot drop all")],
)
def test_bad_drop_lists_are_refused_without_changing_the_model(drop, message):
    model = tiny_model("llama")
    with pytest.raises(LayerpruneError, match=message):
        remove_layers(model, drop)
    assert get_anatomy(model).num_layers == N_LAYERS


def test_parameters_shrink_by_exactly_the_removed_layers():
    model = tiny_model("llama")
    before = count_parameters(model)
    remove_layers(model, DROP)
    after = count_parameters(model)
    assert before["total"] - after["total"] == sum(before["per_layer"][i] for i in DROP)


@pytest.mark.parametrize("family", ["gemma2", "gpt2"])
def test_untie_embeddings_gives_lm_head_its_own_copy(family, tmp_path):
    model = tiny_model(family)
    ids = tiny_input()
    expected = logits(model, ids)
    assert get_anatomy(model).tied_embeddings
    assert untie_embeddings(model)
    anatomy = get_anatomy(model)
    assert not anatomy.tied_embeddings
    torch.testing.assert_close(logits(model, ids), expected)
    with torch.no_grad():
        anatomy.lm_head.weight.mul_(2)
    changed = logits(model, ids)
    save_model(model, None, tmp_path / "untied")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "untied").eval()
    assert not get_anatomy(reloaded).tied_embeddings
    torch.testing.assert_close(logits(reloaded, ids), changed)
    assert not untie_embeddings(model)


def test_device_map_model_is_pruned_and_its_map_renumbered(tmp_path):
    """accelerate names blocks by position in hf_device_map: after pruning, removed blocks leave it, later ones
    take their new positions, and every entry keeps its device.

    Blocks alternate between CPU and disk offload (and block 3 is split by sub-module) so that the devices tell
    the blocks apart; transformers keeps no hf_device_map at all for a map that puts everything on one device.
    """
    save_model(tiny_model("llama"), None, tmp_path / "full")
    outside = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu"}
    block_3 = {"self_attn": "disk", "mlp": "cpu", "input_layernorm": "cpu", "post_attention_layernorm": "disk"}

    def layer_entries(placement):  # {position: device, or {sub-module: device}} -> hf_device_map entries
        entries = {}
        for pos, device in placement.items():
            if isinstance(device, dict):
                entries.update({f"model.layers.{pos}.{sub}": d for sub, d in device.items()})
            else:
                entries[f"model.layers.{pos}"] = device
        return entries

    device_map = {**outside, **layer_entries({0: "cpu", 1: "disk", 2: "cpu", 3: block_3, 4: "cpu"})}
    dispatched = AutoModelForCausalLM.from_pretrained(tmp_path / "full", device_map=device_map,
                                                      offload_folder=tmp_path / "offload").eval()
    assert dispatched.hf_device_map == device_map, "precondition: accelerate dispatched the model by this map"
    ids = tiny_input()
    with bypass_layers(dispatched, DROP):
        reference = logits(dispatched, ids)

    remove_layers(dispatched, DROP)  # original layers 2 and 4
    assert dispatched.hf_device_map == {**outside, **layer_entries({0: "cpu", 1: "disk", 2: block_3})}
    torch.testing.assert_close(logits(dispatched, ids), reference, rtol=1e-5, atol=1e-5)

    remove_layers(dispatched, [1])  # a second prune speaks original indices; the map follows again
    assert dispatched.hf_device_map == {**outside, **layer_entries({0: "cpu", 1: block_3})}
    assert kept_layers(dispatched) == [0, 3]
    undispatched = tiny_model("llama")
    with bypass_layers(undispatched, [1, 2, 4]):
        expected = logits(undispatched, ids)
    torch.testing.assert_close(logits(dispatched, ids), expected, rtol=1e-5, atol=1e-5)
