"""A run from one YAML on a tiny model: every stage leaves its file, reruns resume, errors name the key."""

import json

import pytest
import torch
import yaml

from layerprune import LayerpruneError, save_model
from layerprune.config import load_run_config
from layerprune.runs.pipeline import run_pipeline
from tiny_models import CORPUS, N_LAYERS, tiny_model, tiny_tokenizer

TEXT = CORPUS  # tiny_models.CORPUS, shared


@pytest.fixture
def workspace(tmp_path):
    return make_workspace(tmp_path)


def make_workspace(tmp_path):
    """A tiny model, a text file and an instruction file in tmp_path."""
    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(TEXT)
    with open(tmp_path / "sft.jsonl", "w") as f:
        for w in ("cat", "dog", "owl", "sun") * 4:
            f.write(json.dumps({"instruction": f"say {w}", "context": "", "response": f"{w} {w}"}) + "\n")
    return tmp_path


def CALIBRATION(tmp_path):
    return {"source": str(tmp_path / "text.txt"), "n_samples": 4, "seq_len": 32}


def write_config(tmp_path, **overrides):
    config = {
        "model": str(tmp_path / "tiny"),
        "out": str(tmp_path / "run"),
        "prune": {"metric": ["block-influence", "reverse-order"], "select": "auto", "num_layers": 2,
                  "calibration": CALIBRATION(tmp_path)},
        "heal": [{"method": "partial", "data": str(tmp_path / "sft.jsonl"), "max_steps": 3, "batch_size": 4,
                  "effective_batch_size": 4, "warmup_steps": 0, "learning_rate": 1e-3, "max_length": 64,
                  "bf16": False}],
        "eval": {"tasks": "none", "ppl": str(tmp_path / "text.txt"), "seq_len": 32, "ppl_windows": 4, "samples": False},
        "bench": {"batch_sizes": [1], "new_tokens": [4], "warmup": 0, "runs": 1, "seq_len": 8},
    }
    config.update(overrides)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.integration
def test_one_shot_run_writes_every_stage_and_resumes(workspace):
    config = load_run_config(write_config(workspace))
    summary = run_pipeline(config, log=lambda m: None)
    run = workspace / "run"
    for name in ("config.yaml", "versions.json", "scores.json", "selection.json", "pruned/config.json",
                 "healed-1/heal.json", "healed-1/loss.csv", "eval-original/eval.json", "eval-pruned/eval.json",
                 "eval-final/eval.json", "bench/bench.json", "report.md", "run.json"):
        assert (run / name).exists(), name
    selection = json.loads((run / "selection.json").read_text())
    assert set(selection["candidates"]) == {"block-influence", "reverse-order"}
    losses = {n: c["validation_loss"] for n, c in selection["candidates"].items()}
    assert selection["chosen_by"] == f"auto:{min(losses, key=losses.get)}"
    assert summary["eval"]["final"]["layers"] == N_LAYERS - 2
    assert "validation loss" in (run / "report.md").read_text()

    # A rerun finds every stage done and changes nothing.
    stamp = (run / "healed-1" / "model.safetensors").stat().st_mtime_ns
    run_pipeline(config, log=lambda m: None)
    assert (run / "healed-1" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.integration
def test_iterative_schedule_drops_one_layer_per_round_in_original_indices(workspace):
    path = write_config(workspace, prune={"metric": "reverse-order", "strategy": "iterative", "schedule": "1:1:2"},
                        eval=None, bench=None)
    summary = run_pipeline(load_run_config(path), log=lambda m: None)
    # reverse-order re-scored on the shrunken model drops the current last layer each round
    assert summary["rounds"] == [[N_LAYERS - 1], [N_LAYERS - 2]]
    final = json.loads((workspace / "run" / "rounds" / "round-2" / "healed-1" / "layerprune.json").read_text())
    assert final["dropped_layers"] == [N_LAYERS - 2, N_LAYERS - 1]


@pytest.mark.integration
def test_interrupted_iterative_run_resumes_from_its_last_round(workspace, monkeypatch):
    path = write_config(workspace, prune={"metric": "reverse-order", "strategy": "iterative", "schedule": "1:1:2"},
                        heal=[], eval=None, bench=None)
    import layerprune.runs.steps as steps

    original_choose = steps.choose
    calls = []

    def failing_choose(run, loaded, n_drop=None, scores_name="scores.json"):
        calls.append(scores_name)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return original_choose(run, loaded, n_drop, scores_name)

    monkeypatch.setattr(steps, "choose", failing_choose)
    with pytest.raises(RuntimeError, match="injected"):
        run_pipeline(load_run_config(path), log=lambda m: None)
    assert (workspace / "run" / "rounds" / "round-1" / "done.json").exists()
    summary = run_pipeline(load_run_config(path), log=lambda m: None)
    assert calls == ["rounds/round-1/scores.json", "rounds/round-2/scores.json", "rounds/round-2/scores.json"]
    assert summary["rounds"] == [[N_LAYERS - 1], [N_LAYERS - 2]]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"prune": {"metric": "nonsense", "num_layers": 2}}, "prune.metric: unknown metric 'nonsense'"),
        ({"prune": {"metric": "reverse-order", "num_layers": -1}}, "prune.num_layers"),
        ({"prune": {"metric": "reverse-order"}}, "exactly one of drop, num_layers, ratio, target_params or target_latency"),
        ({"prune": {"metric": "reverse-order", "strategy": "iterative", "schedule": "1:3:8"}}, "multiple of the step"),
        ({"heal": [{"method": "partial", "learning_rate": 0}]}, "heal.0.learning_rate"),
        ({"colour": "blue"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_config_errors_name_the_key(workspace, overrides, message):
    with pytest.raises(LayerpruneError, match=message.replace("(", r"\(")):
        load_run_config(write_config(workspace, **overrides))


@pytest.mark.parametrize("name", ["quickstart", "thorough", "paper", "llama-3.1-8b"])
def test_example_configs_are_valid(name):
    from pathlib import Path

    import yaml

    path = Path(__file__).parent.parent / "examples" / f"{name}.yaml"
    config, written = load_run_config(path), yaml.safe_load(path.read_text())
    # every setting the file writes reaches the config (a key the schema dropped would fail here)
    assert config.model == written["model"] and len(config.heal) == len(written["heal"]) >= 1
    for key, value in written["prune"].items():
        if key != "calibration":
            assert getattr(config.prune, key) == value, key
    for stage, settings in zip(config.heal, written["heal"]):
        assert all(getattr(stage, key) == value for key, value in settings.items()), settings


@pytest.mark.parametrize("name, settings", [("paper-table1", 7), ("paper-table2", 3), ("paper-table5", 12),
                                            ("smollm2-table5", 6), ("heal-study", 7)])
def test_example_studies_are_valid(name, settings):
    from pathlib import Path

    from layerprune.runs.study import load_study

    study = load_study(Path(__file__).parent.parent / "examples" / f"{name}.yaml")
    assert len(study.settings) == settings


@pytest.mark.integration
def test_run_killed_during_healing_resumes_to_the_same_weights(workspace, monkeypatch):
    """An injected failure at optimizer step 3 (checkpoints every step), then a rerun: it resumes from the
    last checkpoint, and the healed weights equal those of an uninterrupted run with the same seed."""
    import torch
    from safetensors.torch import load_file

    heal = [{"method": "partial", "data": str(workspace / "sft.jsonl"), "max_steps": 4, "save_steps": 1,
             "batch_size": 4, "effective_batch_size": 4, "warmup_steps": 0, "learning_rate": 1e-2,
             "max_length": 64, "bf16": False, "train_last_layers": 1}]
    prune = {"metric": "reverse-order", "num_layers": 2}
    clean = write_config(workspace, prune=prune, heal=heal, eval=None, bench=None, out=str(workspace / "clean"))
    run_pipeline(load_run_config(clean), log=lambda m: None)

    step = torch.optim.AdamW.step
    calls = []

    def failing_step(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return step(self, *args, **kwargs)

    killed = write_config(workspace, prune=prune, heal=heal, eval=None, bench=None, out=str(workspace / "killed"))
    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", failing_step)
        with pytest.raises(RuntimeError, match="injected"):
            run_pipeline(load_run_config(killed), log=lambda m: None)
    assert not (workspace / "killed" / "healed-1").exists()
    [work] = (workspace / "killed").glob(".healed-1.checkpoints-*")  # named by the digest of its settings
    assert (work / "checkpoint-2").is_dir()
    resumed_steps = []

    def counting_step(self, *args, **kwargs):
        resumed_steps.append(1)
        return step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", counting_step)
        run_pipeline(load_run_config(killed), log=lambda m: None)
    assert len(resumed_steps) == 2  # steps 3 and 4 only: it resumed, it did not start over
    a = load_file(workspace / "clean" / "healed-1" / "model.safetensors")
    b = load_file(workspace / "killed" / "healed-1" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    pruned = load_file(workspace / "clean" / "pruned" / "model.safetensors")
    assert not torch.equal(pruned["lm_head.weight"], a["lm_head.weight"])  # healing changed something


def test_set_overrides_reach_nested_keys_and_bad_ones_name_themselves(workspace):
    path = write_config(workspace)
    config = load_run_config(path, sets=["heal.0.learning_rate=1e-4", "prune.num_layers=1", "eval=null"])
    assert config.heal[0].learning_rate == 1e-4 and config.prune.num_layers == 1 and config.eval is None
    with pytest.raises(LayerpruneError, match="write it as key=value"):
        load_run_config(path, sets=["heal.0.learning_rate"])
    with pytest.raises(LayerpruneError, match="heal.0.learning_rate"):
        load_run_config(path, sets=["heal.0.learning_rate=fast"])


@pytest.mark.integration
def test_cli_run_prints_the_report_verbatim(workspace):
    """report.md is printed as written (rich markup off: `![scores](scores.png)` must survive)."""
    from typer.testing import CliRunner

    from layerprune.cli import app

    path = write_config(workspace, heal=[], eval=None, bench=None)
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "![scores](scores.png)" in result.output
    assert (workspace / "run" / "report.md").read_text().strip() in result.output


@pytest.mark.integration
def test_a_run_cuts_the_checkpoint_on_disk_when_a_second_copy_does_not_fit(workspace, monkeypatch):
    """Same drop-set and byte-identical weights as the in-memory prune; the report still comes out."""
    import layerprune.models.memory_policy as memory_policy
    from safetensors.torch import load_file

    overrides = dict(heal=[], eval=None, bench=None)
    in_memory = load_run_config(write_config(workspace, out=str(workspace / "in-memory"), **overrides))
    run_pipeline(in_memory, log=lambda m: None)
    monkeypatch.setattr(memory_policy, "available_memory_bytes", lambda: 1000)  # nothing fits
    messages = []
    run_pipeline(load_run_config(write_config(workspace, **overrides)), log=messages.append)
    assert any("cut from the checkpoint on disk" in m for m in messages)
    selection = json.loads((workspace / "run" / "selection.json").read_text())
    assert selection["dropped"] == json.loads((workspace / "in-memory" / "selection.json").read_text())["dropped"]
    on_disk = load_file(workspace / "run" / "pruned" / "model.safetensors")
    reference = load_file(workspace / "in-memory" / "pruned" / "model.safetensors")
    assert on_disk.keys() == reference.keys()
    assert all(torch.equal(on_disk[name], reference[name]) for name in reference)
    assert (workspace / "run" / "report.md").exists()
