"""Attention-only and MLP-only removal: logits, KV cache, generation, save/reload (layerprune only), metrics, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from transformers.cache_utils import DummyLayer
from typer.testing import CliRunner

from cli_asserts import assert_one_line_error
from layerprune import LayerpruneError, get_anatomy, kept_layers, load_model, remove_layers, save_model
from layerprune.cli import app
from layerprune.config import load_run_config
from layerprune.selection.config import PruneConfig
from layerprune.common.config_base import build_config
from layerprune.data.calibration import CalibrationData
from layerprune.export.gguf import check_exportable
from layerprune.importance import compute_many, compute_scores
from layerprune.models.anatomy import count_parameters
from layerprune.models.sublayer import (
    ARCHITECTURE_MARKER,
    WEIGHTS_NAME,
    AttentionSkipped,
    MLPSkipped,
    remove_attention,
    remove_mlp,
    removed_sublayers,
)
from layerprune.runs.pipeline import run_pipeline
from tiny_models import N_LAYERS, tiny_input, tiny_model, tiny_tokenizer

# Every family whose blocks are two sequential pre-norm residual branches (anatomy attention_norms/mlp_norms).
SUPPORTED = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen3_moe"]
UNSUPPORTED = ["gpt2", "gpt_neox", "opt"]
ATTN = [0, 2]  # layer 0 too: the cache must not take the sequence length from a layer without attention
MLP = [1, 3]
runner = CliRunner()


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def zeroed_branch_logits(model, kind: str, layers: list[int], ids) -> torch.Tensor:
    """Reference: the intact model with the chosen branches' outputs replaced by zeros (hooks, no surgery)."""
    spec = get_anatomy(model).spec
    blocks = get_anatomy(model).layers

    def zero(module, args, out):
        if isinstance(out, tuple):
            return (torch.zeros_like(out[0]),) + tuple(out[1:])
        return torch.zeros_like(out)

    name = spec.attention if kind == "attention" else spec.mlp
    handles = [getattr(blocks[i], name).register_forward_hook(zero) for i in layers]
    try:
        return logits(model, ids)
    finally:
        for handle in handles:
            handle.remove()


# ---------------------------------------------------------------------------------------------
# The forward pass
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", SUPPORTED)
def test_attention_removed_logits_equal_a_forward_that_skips_the_attention_branch(family):
    model = tiny_model(family)
    ids = tiny_input()
    reference = zeroed_branch_logits(model, "attention", ATTN, ids)
    intact = logits(model, ids)
    before = count_parameters(model)["total"]
    spec = get_anatomy(model).spec
    branch_params = sum(
        p.numel()
        for i in ATTN
        for name in (spec.attention, *spec.attention_norms)
        for p in getattr(get_anatomy(model).layers[i], name).parameters()
    )
    remove_attention(model, ATTN)
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(model, ids), intact, atol=1e-3), "removing attention must change the output"
    assert count_parameters(model)["total"] == before - branch_params
    for i in ATTN:
        assert isinstance(getattr(get_anatomy(model).layers[i], spec.attention), AttentionSkipped)
    assert removed_sublayers(model) == {"attention": ATTN, "mlp": []}
    assert kept_layers(model) == list(range(N_LAYERS))


@pytest.mark.parametrize("family", SUPPORTED)
def test_mlp_removed_logits_equal_a_forward_that_skips_the_mlp_branch(family):
    model = tiny_model(family)
    ids = tiny_input()
    reference = zeroed_branch_logits(model, "mlp", MLP, ids)
    intact = logits(model, ids)
    remove_mlp(model, MLP)
    torch.testing.assert_close(logits(model, ids), reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(model, ids), intact, atol=1e-3)
    spec = get_anatomy(model).spec
    for i in MLP:
        block = get_anatomy(model).layers[i]
        assert isinstance(getattr(block, spec.mlp), MLPSkipped)
        assert all(isinstance(getattr(block, n), torch.nn.Identity) for n in spec.mlp_norms)


@torch.no_grad()
def test_llama_attention_removal_equals_a_hand_written_forward():
    """The reference written out: x += mlp(norm(x)) only, in the layers whose attention went."""
    model = tiny_model("llama")
    ids = tiny_input()
    inner = model.model
    h = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    rotary = inner.rotary_emb(h, positions)
    for i, block in enumerate(inner.layers):
        if i not in ATTN:  # attention_mask None: causal SDPA
            h = h + block.self_attn(block.input_layernorm(h), position_embeddings=rotary, attention_mask=None)[0]
        h = h + block.mlp(block.post_attention_layernorm(h))
    expected = model.lm_head(inner.norm(h))
    remove_attention(model, ATTN)
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# KV cache and generation
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", SUPPORTED)
def test_kv_cache_holds_nothing_for_a_removed_attention(family):
    model = tiny_model(family)
    remove_attention(model, ATTN)
    ids = tiny_input(length=6)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert len(cache.layers) == N_LAYERS
    for i, layer in enumerate(cache.layers):
        if i in ATTN:
            assert isinstance(layer, DummyLayer) and layer.keys is None and layer.values is None
        else:
            assert layer.keys.shape[0] == ids.shape[0] and layer.keys.shape[-2] > 0  # (sliding layers keep fewer)
    assert cache.get_seq_length() == ids.shape[1]  # from a live layer, though layer 0 has no attention


@pytest.mark.parametrize("family", SUPPORTED)
def test_cached_greedy_generation_matches_full_forward(family):
    model = tiny_model(family)
    remove_attention(model, ATTN)
    remove_mlp(model, [3])
    prompt = tiny_input(batch=1, length=10)
    with torch.no_grad():
        generated = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, min_new_tokens=6,
            do_sample=False, use_cache=True, pad_token_id=0,
        )
    ids = prompt
    for _ in range(6):
        ids = torch.cat([ids, logits(model, ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, ids)


def test_a_lazily_grown_cache_gets_a_dummy_slot_too():
    from transformers import DynamicCache

    model = tiny_model("llama")
    remove_attention(model, [1])
    cache = DynamicCache()  # no config: layers are appended on first update
    with torch.no_grad():
        model(input_ids=tiny_input(length=5), past_key_values=cache, use_cache=True)
    assert [type(layer).__name__ for layer in cache.layers].count("DummyLayer") == 1
    assert isinstance(cache.layers[1], DummyLayer) and cache.get_seq_length() == 5


# ---------------------------------------------------------------------------------------------
# Save and reload: layerprune only
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3_moe"])
def test_save_and_reload_through_layerprune(family, tmp_path):
    from safetensors import safe_open

    model = tiny_model(family)
    ids = tiny_input()
    original_numel = count_parameters(model)["total"]
    remove_attention(model, [1], how={"chosen_by": "explicit"})
    remove_mlp(model, [3])
    expected = logits(model, ids)
    save_model(model, None, tmp_path / "pruned")

    folder = tmp_path / "pruned"
    with safe_open(folder / WEIGHTS_NAME, "pt") as f:
        stored = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert stored == count_parameters(model)["total"] < original_numel  # the removed weights are gone
    assert not (folder / "model.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE_MARKER]
    assert config["layerprune"]["removed_sublayers"] == {"attention": [1], "mlp": [3]}
    assert json.loads((folder / "layerprune.json").read_text())["removed_sublayers"] == {"attention": [1], "mlp": [3]}
    assert "layerprune" in (folder / "README.md").read_text()

    reloaded = load_model(folder, load_tokenizer=False).model
    assert type(reloaded) is type(model)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=0, atol=0)
    assert removed_sublayers(reloaded) == {"attention": [1], "mlp": [3]}
    anatomy = get_anatomy(reloaded)
    assert anatomy.tied_embeddings == get_anatomy(model).tied_embeddings


def test_stock_transformers_refuses_the_folder_loudly(tmp_path):
    model = tiny_model("llama")
    remove_attention(model, [2])
    save_model(model, None, tmp_path / "pruned")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")


def test_whole_layer_removal_after_attention_removal_keeps_the_record_and_the_cache(tmp_path):
    model = tiny_model("qwen3")
    remove_attention(model, [1, 3])
    remove_layers(model, [1, 4])
    assert removed_sublayers(model) == {"attention": [3], "mlp": []}
    assert kept_layers(model) == [0, 2, 3]
    assert get_anatomy(model).layers[2].self_attn.layer_idx == 2  # renumbered with the block
    ids = tiny_input(batch=1, length=7)
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True).past_key_values
    assert isinstance(cache.layers[2], DummyLayer) and cache.get_seq_length() == 7
    expected = logits(model, ids)
    save_model(model, None, tmp_path / "pruned")
    torch.testing.assert_close(logits(load_model(tmp_path / "pruned", load_tokenizer=False).model, ids), expected)
    # Dropping every layer with a removed branch leaves a stock model again.
    remove_layers(model, [3])
    assert "removed_sublayers" not in model.config.layerprune


def test_on_disk_pruning_refuses_a_sublayer_folder(tmp_path):
    from layerprune.models.checkpoint import weight_files

    model = tiny_model("llama")
    remove_mlp(model, [0])
    save_model(model, None, tmp_path / "pruned")
    with pytest.raises(LayerpruneError, match="attention-only/MLP-only"):
        weight_files(tmp_path / "pruned")


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error, nothing changed
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m: remove_attention(m, [N_LAYERS]), "out of range"),
        (lambda m: remove_attention(m, [1, 1]), "duplicate"),
        (lambda m: remove_attention(m, []), "no layers given"),
        (lambda m: remove_attention(m, list(range(N_LAYERS))), "at least one must stay"),
        (lambda m: remove_attention(m, [0]) and remove_attention(m, [0]), "already removed"),
        (lambda m: remove_attention(m, [2]) and remove_mlp(m, [2]), "remove the whole layer"),
        (lambda m: remove_layers(m, [2]) and remove_mlp(m, [2]), "already removed"),
    ],
)
def test_bad_requests_are_refused(call, message):
    model = tiny_model("llama")
    with pytest.raises(LayerpruneError, match=message):
        call(model)


@pytest.mark.parametrize("family", UNSUPPORTED)
def test_unsupported_layouts_are_refused_unchanged(family):
    model = tiny_model(family)
    ids = tiny_input()
    before = logits(model, ids)
    with pytest.raises(LayerpruneError, match="not supported"):
        remove_attention(model, [1])
    with pytest.raises(LayerpruneError, match="not supported"):
        remove_mlp(model, [1])
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=0)
    assert "removed_sublayers" not in (getattr(model.config, "layerprune", None) or {})


def test_export_refuses_a_sublayer_model_with_one_error(tmp_path):
    model = tiny_model("llama")
    remove_attention(model, [1])
    save_model(model, None, tmp_path / "pruned")
    with pytest.raises(LayerpruneError, match="attention-only/MLP-only"):
        check_exportable(tmp_path / "pruned")
    result = runner.invoke(app, ["export", str(tmp_path / "pruned"), "--out", str(tmp_path / "x.gguf")])
    assert_one_line_error(result, "attention-only/MLP-only")
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------------------------------
# Sub-block scores
# ---------------------------------------------------------------------------------------------


def calib(ids: torch.Tensor, mask: torch.Tensor | None = None) -> CalibrationData:
    mask = torch.ones_like(ids) if mask is None else mask
    return CalibrationData(ids, mask, description={"source": "test", "n_samples": ids.shape[0]})


@torch.no_grad()
def hand_branch_influence(model, ids, residual_after_attention: str) -> tuple[list[float], list[float]]:
    """x (layer input), h = x + attention branch (the output of `residual_after_attention`'s module), y (layer
    output), all hooked on the intact model; 1 - mean cos, in float64."""
    blocks = get_anatomy(model).layers
    seen: dict[tuple[int, str], torch.Tensor] = {}
    handles = []
    for i, block in enumerate(blocks):
        branch = getattr(block, residual_after_attention)
        handles.append(branch.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__((i, "a"), out[0] if isinstance(out, tuple) else out)))
        handles.append(block.register_forward_hook(
            lambda m, a, k, out, i=i: seen.update({(i, "x"): k.get("hidden_states", a[0] if a else None),
                                                   (i, "y"): out[0] if isinstance(out, tuple) else out}),
            with_kwargs=True))
    model(input_ids=ids, use_cache=False)
    for handle in handles:
        handle.remove()

    def influence(u, v):
        u, v = u.double(), v.double()
        return 1.0 - float(((u * v).sum(-1) / (u.norm(dim=-1) * v.norm(dim=-1))).mean())

    attn, mlp = [], []
    for i in range(len(blocks)):
        x, y = seen[(i, "x")], seen[(i, "y")]
        h = x + seen[(i, "a")]
        attn.append(influence(x, h))
        mlp.append(influence(h, y))
    return attn, mlp


@pytest.mark.parametrize(
    "family, after_attention", [("llama", "self_attn"), ("gemma3_text", "post_attention_layernorm")]
)
def test_branch_influence_matches_hand_computation(family, after_attention):
    model = tiny_model(family)
    ids = tiny_input(batch=3, length=10)
    hand_attn, hand_mlp = hand_branch_influence(model, ids, after_attention)
    scores = compute_many(model, {"attention-influence": {}, "mlp-influence": {"batch_size": 2}}, calib(ids))
    assert scores["attention-influence"].values == pytest.approx(hand_attn, rel=1e-5, abs=1e-7)
    assert scores["mlp-influence"].values == pytest.approx(hand_mlp, rel=1e-5, abs=1e-7)
    assert scores["attention-influence"].layers == list(range(N_LAYERS))


def test_branch_metrics_share_one_pass_and_padding_stays_out():
    model = tiny_model("llama")
    ids = tiny_input(batch=2, length=10)
    padded = torch.cat([ids, torch.randint(3, 100, (2, 5))], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(2, 5, dtype=torch.long)], dim=1)
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    scores = compute_many(model, {"attention-influence": {}, "mlp-influence": {}}, calib(padded, mask))
    handle.remove()
    assert len(calls) == 1
    clean = compute_many(model, {"attention-influence": {}, "mlp-influence": {}}, calib(ids))
    for name in clean:
        assert scores[name].values == pytest.approx(clean[name].values, rel=1e-5)


def test_a_removed_branch_scores_zero():
    model = tiny_model("llama")
    remove_attention(model, [2])
    remove_mlp(model, [4])
    ids = tiny_input(batch=2, length=8)
    attn = compute_scores(model, "attention-influence", calib(ids)).values
    mlp = compute_scores(model, "mlp-influence", calib(ids)).values
    assert attn[2] == pytest.approx(0.0, abs=1e-6) and mlp[4] == pytest.approx(0.0, abs=1e-6)
    assert min(attn[i] for i in (0, 1, 3, 4)) > 1e-4


def test_choose_sublayers_skips_layers_whose_branch_is_gone():
    from layerprune.api import choose_layers

    model = tiny_model("llama")
    remove_attention(model, [2])
    ids = tiny_input(batch=2, length=8)
    dropped, how = choose_layers(model, num_layers=2, metric="attention-influence", calibration=calib(ids),
                                 granularity="attention")
    assert 2 not in dropped and len(dropped) == 2 and how["granularity"] == "attention"
    with pytest.raises(LayerpruneError, match="scores whole layers"):
        choose_layers(model, num_layers=1, metric="angular", calibration=calib(ids), granularity="attention")


# ---------------------------------------------------------------------------------------------
# CLI and run YAML
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tiny_dir(tmp_path):
    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.integration
def test_cli_prunes_attention_only_and_the_result_reloads(tiny_dir, tmp_path):
    result = runner.invoke(app, ["prune", str(tiny_dir), "--granularity", "attention", "--drop", "1,3",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "removed the attention of original layers: 1,3" in result.output
    assert "layerprune.load_model only" in result.output
    model = load_model(tmp_path / "out").model
    assert removed_sublayers(model) == {"attention": [1, 3], "mlp": []}
    info = runner.invoke(app, ["info", str(tmp_path / "out")])
    assert info.exit_code == 0 and "attention removed" in info.output


@pytest.mark.integration
def test_cli_mlp_granularity_defaults_to_mlp_influence(tiny_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat and looked at the sun. " * 40)
    result = runner.invoke(app, ["prune", str(tiny_dir), "--granularity", "mlp", "--num-layers", "2", "--calib",
                                 str(text), "--n-samples", "2", "--seq-len", "16", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "chosen by: mlp-influence" in result.output
    assert len(removed_sublayers(load_model(tmp_path / "out").model)["mlp"]) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--granularity", "attention", "--num-layers", "1", "--metric", "angular"], "scores whole layers"),
        (["--granularity", "heads", "--drop", "1"], "--granularity: Input should be 'block', 'attention' or 'mlp'"),
        (["--granularity", "attention", "--drop", "1", "--no-load"], "--granularity"),
        (["--granularity", "attention", "--drop", "0-4"], "at least one must stay"),
        (["--num-layers", "1", "--metric", "attention-influence"], "not whole layers"),
    ],
)
def test_cli_bad_granularity_requests_are_one_line_errors(tiny_dir, tmp_path, args, message):
    result = runner.invoke(app, ["prune", str(tiny_dir), *args, "--out", str(tmp_path / "out")])
    assert_one_line_error(result, message)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_an_unsupported_layout(tmp_path):
    save_model(tiny_model("gpt2"), None, tmp_path / "gpt2")
    result = runner.invoke(app, ["prune", str(tmp_path / "gpt2"), "--granularity", "mlp", "--drop", "1",
                                 "--out", str(tmp_path / "out")])
    assert_one_line_error(result, "not supported")


def test_prune_config_granularity_defaults_and_refusals():
    assert PruneConfig(granularity="attention", num_layers=1).metric == "attention-influence"
    assert PruneConfig(num_layers=1).metric == "block-influence"
    for data, message in [
        ({"granularity": "mlp", "num_layers": 1, "metric": "taylor"}, "scores whole layers"),
        ({"granularity": "attention", "num_layers": 1, "select": "auto", "metric": ["attention-influence"]},
         "select auto removes whole layers"),
        ({"granularity": "attention", "schedule": "1:2", "strategy": "iterative"}, "iterative"),
        ({"num_layers": 1, "metric": "mlp-influence"}, "not whole layers"),
    ]:
        with pytest.raises(LayerpruneError, match=message):
            build_config(PruneConfig, data)


@pytest.mark.integration
def test_one_shot_run_removes_attention_only(tiny_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text("the dog sat on the mat and looked at the sky. " * 40)
    config = {
        "model": str(tiny_dir), "out": str(tmp_path / "run"),
        "prune": {"granularity": "attention", "num_layers": 2,
                  "calibration": {"source": str(text), "n_samples": 2, "seq_len": 16}},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    run_pipeline(load_run_config(tmp_path / "run.yaml"), log=lambda m: None)
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    assert selection["chosen_by"] == "attention-influence"
    model = load_model(tmp_path / "run" / "pruned").model
    assert removed_sublayers(model)["attention"] == selection["dropped"]
