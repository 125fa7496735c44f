"""Mixture-of-experts checkpoints one layer at a time: the per-expert tensors on disk are fused as transformers
fuses them, so streaming layer scores and streaming expert scores equal those of the loaded model, for every
family; `layerprune score --expert-metric` writes the expert scores."""

import json

import pytest
import torch
from typer.testing import CliRunner

from layerprune.api import score_model
from layerprune.cli import app
from layerprune.data.calibration import calibration_from_texts
from layerprune.importance import compute_many
from layerprune.importance.experts.registry import compute_expert_scores
from layerprune.importance.experts.streaming import stream_expert_scores
from layerprune.importance.streaming import stream_scores
from layerprune.models.saving import save_model
from tiny_models import CORPUS, MOE_FAMILIES, tiny_model, tiny_moe_model, tiny_tokenizer
from cli_asserts import assert_one_line_error

def assert_close_relative(got, want, rtol):
    """Scores to `rtol` of their size (their sums run in another order one layer at a time on another CPU)."""
    torch.testing.assert_close(got.double(), want.double(), rtol=rtol, atol=1e-12)


EXPERT_METRICS = {"reap": {}, "frequency": {}, "soft-count": {}, "activation-norm": {}}


def calibration():
    return calibration_from_texts(tiny_tokenizer(), [CORPUS], n_samples=4, seq_len=32, seed=0, mode="concat",
                                  source="corpus")


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def saved_moe(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    model = tiny_moe_model(request.param).eval()
    save_model(model, tiny_tokenizer(), folder)
    return model, folder


def test_streaming_expert_scores_equal_the_loaded_models(saved_moe):
    model, folder = saved_moe
    streamed = stream_expert_scores(folder, EXPERT_METRICS, calibration(), dtype=torch.float32)
    loaded = compute_expert_scores(model, EXPERT_METRICS, calibration())
    for name in EXPERT_METRICS:
        assert streamed[name].layers == loaded[name].layers and streamed[name].experts == loaded[name].experts
        for got, want in zip(streamed[name].values, loaded[name].values):
            assert_close_relative(torch.tensor(got), torch.tensor(want), rtol=1e-5)
    assert streamed["frequency"].extra["tokens"] == loaded["frequency"].extra["tokens"]


def test_streaming_layer_scores_of_a_moe_checkpoint_equal_the_loaded_models(saved_moe):
    model, folder = saved_moe
    streamed = stream_scores(folder, calibration(), ["block-influence"], dtype=torch.float32)["block-influence"]
    loaded = compute_many(model, {"block-influence": {}}, calibration())["block-influence"]
    assert_close_relative(torch.tensor(streamed.values), torch.tensor(loaded.values), rtol=1e-5)


def test_score_cli_writes_expert_scores_one_layer_at_a_time(tmp_path):
    model = tiny_moe_model("qwen3_moe").eval()
    save_model(model, tiny_tokenizer(), tmp_path / "moe")
    (tmp_path / "text.txt").write_text(CORPUS)
    result = CliRunner().invoke(app, ["score", str(tmp_path / "moe"), "-o", str(tmp_path / "out"), "--metric", "none",
                                      "--expert-metric", "reap,frequency", "--streaming", "--dtype", "fp32", "--calib",
                                      str(tmp_path / "text.txt"), "--n-samples", "4", "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "out" / "expert_scores.json").read_text())
    assert set(written["metrics"]) == {"reap", "frequency"} and not (tmp_path / "out" / "scores.json").exists()
    in_memory = score_model(str(tmp_path / "moe"), metric="none", expert_metric="reap", dtype="fp32", log=print,
                            calibration={"source": str(tmp_path / "text.txt"), "n_samples": 4, "seq_len": 32})
    reap = in_memory.experts["reap"]
    assert_close_relative(torch.tensor(written["metrics"]["reap"]["values"]), torch.tensor(reap.values), rtol=1e-5)
    lowest = min(zip(reap.values[0], reap.experts[0]))[1]
    row = next(line for line in (tmp_path / "out" / "expert_scores.md").read_text().splitlines()
               if line.startswith("| reap | 0 |"))
    assert row.split("|")[3].strip().split(", ")[0] == str(lowest)  # the lowest score is listed first


@pytest.mark.parametrize("args, fragment", [
    (["--expert-metric", "reap"], "is not a supported mixture-of-experts model"),
    (["--metric", "none"], "nothing to score"),
    (["--expert-metric", "nosuch"], "nosuch"),
])
def test_score_cli_refuses_expert_scores_it_cannot_make(tmp_path, args, fragment):
    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "dense")
    result = CliRunner().invoke(app, ["score", str(tmp_path / "dense"), "-o", str(tmp_path / "out"), *args])
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_missing_one_experts_tensor_is_refused_by_name(tmp_path):
    from safetensors.torch import load_file, save_file

    from layerprune.errors import LayerpruneError

    tiny_moe_model("mixtral").save_pretrained(tmp_path)  # experts stored one tensor each, fused on load
    tensors = load_file(tmp_path / "model.safetensors")
    gone = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    del tensors[gone]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LayerpruneError, match="no tensor for model.layers.1.mlp.experts.down_proj"):
        stream_scores(tmp_path, calibration(), ["magnitude-l1"])


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_no_load_expert_budget_cuts_the_same_experts_as_the_loaded_model(tmp_path, family):
    from transformers import AutoModelForCausalLM

    from layerprune.api import prune_model

    save_model(tiny_moe_model(family).eval(), tiny_tokenizer(), tmp_path / "moe")
    (tmp_path / "text.txt").write_text(CORPUS)
    settings = dict(expert_ratio=0.25, dtype="fp32", log=lambda _: None,
                    calibration={"source": str(tmp_path / "text.txt"), "n_samples": 4, "seq_len": 32})
    on_disk = prune_model(str(tmp_path / "moe"), out=str(tmp_path / "disk"), no_load=True, **settings)
    loaded = prune_model(str(tmp_path / "moe"), out=str(tmp_path / "memory"), **settings)
    assert on_disk.on_disk and on_disk.experts["dropped"] == loaded.experts["dropped"]
    assert on_disk.chosen_by == "reap"
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    outputs = [AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()(ids).logits
               for name in ("disk", "memory")]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


def test_no_load_expert_budget_with_a_layer_budget_is_refused(tmp_path):
    save_model(tiny_moe_model("qwen3_moe"), tiny_tokenizer(), tmp_path / "moe")
    result = CliRunner().invoke(app, ["prune", str(tmp_path / "moe"), "-o", str(tmp_path / "out"), "--no-load",
                                      "--expert-ratio", "0.25", "--num-layers", "1"])
    assert_one_line_error(result, "removes experts only")
    assert not (tmp_path / "out").exists()
