"""A YAML run removes experts in its prune stage (after the layers, as `prune_model` does), records them in
selection.json, reuses that record when the pruned model must be made again, and heals and evaluates the
result like any pruned model."""

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from layerprune.api import prune_model
from layerprune.config import load_run_config
from layerprune.models.saving import save_model
from layerprune.runs.pipeline import run_pipeline
from tiny_models import CORPUS, N_EXPERTS, tiny_moe_model, tiny_tokenizer

QUIET = dict(log=lambda _: None)


@pytest.fixture
def moe_run(tmp_path):
    save_model(tiny_moe_model("qwen2_moe"), tiny_tokenizer(), tmp_path / "moe")  # 3 layers, layer 1 dense
    (tmp_path / "text.txt").write_text(CORPUS)
    return tmp_path


def write_run(tmp_path, prune: dict, heal: list | None = None):
    calibration = {"source": str(tmp_path / "text.txt"), "n_samples": 4, "seq_len": 32}
    config = {"model": str(tmp_path / "moe"), "out": str(tmp_path / "run"),
              "prune": {**prune, "calibration": calibration}, "heal": heal or [],
              "eval": {"tasks": "none", "ppl": str(tmp_path / "text.txt"), "seq_len": 32, "ppl_windows": 4,
                       "samples": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_run_config(path)


def logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.integration
def test_a_run_removes_layers_then_experts_as_prune_model_does(moe_run):
    prune = {"metric": "reverse-order", "num_layers": 1, "expert_ratio": 0.25, "expert_metric": "reap"}
    heal = [{"method": "partial", "data": str(moe_run / "text.txt"), "max_steps": 2, "batch_size": 2,
             "warmup_steps": 0, "max_length": 32, "train_last_layers": 1}]
    summary = run_pipeline(write_run(moe_run, prune, heal), **QUIET)
    run = moe_run / "run"
    selection = json.loads((run / "selection.json").read_text())
    assert selection["dropped"] == [2]
    assert selection["experts"]["chosen_by"] == "reap" and selection["experts"]["experts_per_layer"] == 2
    assert set(selection["experts"]["dropped"]) == {"0"}  # layer 1 is dense, layer 2 went first
    pruned = AutoModelForCausalLM.from_pretrained(run / "pruned")
    assert pruned.config.num_hidden_layers == 2 and pruned.config.num_experts == N_EXPERTS - 2
    assert summary["eval"]["final"]["layers"] == 2
    report = (run / "report.md").read_text()
    gone = "; ".join(f"layer {k}: {', '.join(map(str, v))}" for k, v in selection["experts"]["dropped"].items())
    assert f"Removed **2 experts** from every MoE layer (chosen by reap; original indices): {gone}." in report

    # The same settings through prune_model choose the same experts and give the same model.
    api = prune_model(str(moe_run / "moe"), out=str(moe_run / "api"), metric="reverse-order", num_layers=1,
                      expert_ratio=0.25, calibration={"source": str(moe_run / "text.txt"), "n_samples": 4,
                                                      "seq_len": 32}, **QUIET)
    assert api.experts["dropped"] == selection["experts"]["dropped"]
    ids = torch.tensor([[1, 5, 9, 3, 7, 2]])
    torch.testing.assert_close(logits(run / "pruned", ids), logits(moe_run / "api", ids), rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_experts_alone_keep_every_layer_and_a_lost_pruned_model_is_remade_from_the_record(moe_run, monkeypatch):
    config = write_run(moe_run, {"num_experts": 3, "expert_metric": "frequency"})
    run_pipeline(config, **QUIET)
    run = moe_run / "run"
    selection = json.loads((run / "selection.json").read_text())
    assert selection["dropped"] == [] and selection["experts"]["experts_per_layer"] == 3
    assert set(selection["experts"]["dropped"]) == {"0", "2"}
    ids = torch.tensor([[4, 8, 15, 16, 23, 42 % 30]])
    before = logits(run / "pruned", ids)
    assert AutoModelForCausalLM.from_pretrained(run / "pruned").config.num_hidden_layers == 3

    # The pruned model is lost; the rerun cuts the recorded experts again without scoring anything.
    import shutil

    from layerprune.selection import experts

    shutil.rmtree(run / "pruned")
    for done in run.glob("**/done.json"):
        done.unlink()

    def no_scoring(*args, **kwargs):
        raise AssertionError("experts scored again")

    monkeypatch.setattr(experts, "compute_expert_scores", no_scoring)
    run_pipeline(config, **QUIET)
    torch.testing.assert_close(logits(run / "pruned", ids), before, rtol=0, atol=0)
    assert json.loads((run / "selection.json").read_text()) == selection
