"""The door: prune_model and `layerprune prune` remove experts (alone or after layers), and a dense model
given an expert budget gets one clear error with nothing written."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from layerprune.api import prune_model
from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.models.experts.surgery import remove_experts
from layerprune.models.saving import save_model
from tiny_models import CORPUS, N_EXPERTS, tiny_model, tiny_moe_model, tiny_tokenizer
from cli_asserts import assert_one_line_error


@pytest.fixture
def moe_dir(tmp_path):
    save_model(tiny_moe_model("qwen3_moe"), tiny_tokenizer(), tmp_path / "moe")
    (tmp_path / "text.txt").write_text(CORPUS)
    return tmp_path


def calibration(tmp_path):
    return {"source": str(tmp_path / "text.txt"), "n_samples": 4, "seq_len": 32}


@pytest.mark.parametrize("metric", ["reap", "frequency", "random"])
def test_prune_model_removes_experts_alone(moe_dir, metric):
    out = moe_dir / f"out-{metric}"
    result = prune_model(str(moe_dir / "moe"), out=str(out), expert_ratio=0.25, expert_metric=metric,
                         calibration=calibration(moe_dir), log=lambda _: None)
    assert result.dropped == [] and result.layers_after == result.layers_before
    assert result.experts["experts_per_layer"] == 2 and result.params_after < result.params_before
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_experts == N_EXPERTS - 2
    record = json.loads((out / "layerprune.json").read_text())
    assert record["experts"]["dropped"] == result.experts["dropped"]
    assert all(len(v) == 2 for v in result.experts["dropped"].values())
    assert record["selection"]["experts"]["chosen_by"] == metric
    with torch.no_grad():
        reloaded(input_ids=torch.tensor([[5, 6, 7]]))


def test_layers_then_experts_in_one_prune(moe_dir):
    out = moe_dir / "both"
    result = prune_model(str(moe_dir / "moe"), out=str(out), drop=[0], num_experts=4, expert_metric="soft-count",
                         calibration=calibration(moe_dir), log=lambda _: None)
    assert result.dropped == [0] and list(result.experts["dropped"]) == ["1"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.num_hidden_layers == 1 and reloaded.config.num_experts == N_EXPERTS - 4


def test_a_dense_model_is_refused_before_anything_is_written(tmp_path):
    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "dense")
    with pytest.raises(LayerpruneError, match="not a supported mixture-of-experts"):
        prune_model(str(tmp_path / "dense"), out=str(tmp_path / "out"), expert_ratio=0.25, log=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_cli_prunes_experts_and_refuses_bad_budgets(moe_dir):
    runner = CliRunner()
    result = runner.invoke(app, ["prune", str(moe_dir / "moe"), "--out", str(moe_dir / "cli"), "--num-experts", "2",
                                 "--expert-metric", "frequency", "--calib", str(moe_dir / "text.txt"),
                                 "--n-samples", "4", "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    assert "removed 2 experts from each MoE layer" in result.output
    assert AutoModelForCausalLM.from_pretrained(moe_dir / "cli").config.num_experts == N_EXPERTS - 2
    for args, message in [(["--num-experts", "7"], "at least 2 must stay"),
                          (["--expert-ratio", "0.25", "--num-experts", "2"], "not several"),
                          (["--num-experts", "2", "--no-load", "--num-layers", "1"], "removes experts only"),
                          (["--drop-experts", "0:1;1:1", "--no-load", "--num-experts", "1"], "not several")]:
        bad = runner.invoke(app, ["prune", str(moe_dir / "moe"), "--out", str(moe_dir / "bad"), *args])
        assert_one_line_error(bad, message)
        assert not (moe_dir / "bad").exists()


def test_info_shows_experts_per_layer(moe_dir):
    runner = CliRunner()
    prune_model(str(moe_dir / "moe"), out=str(moe_dir / "cut"), num_experts=2, expert_metric="random",
                log=lambda _: None)
    result = runner.invoke(app, ["info", str(moe_dir / "cut")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "experts per MoE layer" in result.output and f"6 (original {N_EXPERTS}), top-2" in result.output
    assert "experts removed, layer 0" in result.output
    dense = runner.invoke(app, ["info", str(moe_dir / "moe")], terminal_width=200)
    assert "experts removed" not in dense.output and "experts per MoE layer" in dense.output


def test_model_card_names_the_removed_experts(tmp_path):
    model = tiny_moe_model("qwen2_moe")
    remove_experts(model, {0: [1, 6], 2: [2, 5]}, how={"chosen_by": "reap"})
    save_model(model, None, tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "experts removed from its mixture-of-experts layers" in card
    assert "- experts per MoE layer now: 6" in card
    assert "- removed from layer 2 (original expert indices): 2, 5" in card
    assert "removed experts (layer 0: 1, 6; layer 2: 2, 5): the lowest `reap` scores" in card


def test_metrics_lists_the_expert_metrics():
    result = CliRunner().invoke(app, ["metrics"], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in ("reap", "frequency", "soft-count", "activation-norm"):
        assert name in result.output


def test_explicit_experts_need_no_calibration(moe_dir):
    out = moe_dir / "explicit"
    result = prune_model(str(moe_dir / "moe"), out=str(out), drop_experts={0: [1, 6], 1: [0, 7]}, log=lambda _: None)
    assert result.experts == {"dropped": {"0": [1, 6], "1": [0, 7]}, "chosen_by": "explicit", "experts_per_layer": 2}
    record = json.loads((out / "layerprune.json").read_text())
    assert record["experts"]["kept"]["1"] == [1, 2, 3, 4, 5, 6]
    with pytest.raises(LayerpruneError, match="every MoE layer must keep as many"):
        prune_model(str(moe_dir / "moe"), out=str(moe_dir / "uneven"), drop_experts={0: [1]}, log=lambda _: None)
    assert not (moe_dir / "uneven").exists()


def test_cli_reads_explicit_experts(moe_dir):
    runner = CliRunner()
    result = runner.invoke(app, ["prune", str(moe_dir / "moe"), "--out", str(moe_dir / "cli"),
                                 "--drop-experts", "0:1,6; 1:0-1"])
    assert result.exit_code == 0, result.output
    assert "layer 1: 0,1" in result.output
    for text, message in [("0:1;0:2", "layer 0 is given twice"), ("1,6", "write them like '0:1,6;1:0,7'"),
                          ("0:x", "layer 0: could not read expert indices")]:
        assert_one_line_error(runner.invoke(app, ["prune", str(moe_dir / "moe"), "--out", str(moe_dir / "bad"),
                                                  "--drop-experts", text]), message)
    assert_one_line_error(runner.invoke(app, ["prune", str(moe_dir / "moe"), "--out", str(moe_dir / "bad"),
                                              "--drop-experts", "0:1;1:1", "--num-experts", "1"]), "not several")
    assert not (moe_dir / "bad").exists()
