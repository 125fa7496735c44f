"""A rerun never keeps output made with other settings, a failed stage leaves nothing that blocks the next
run, and one run at a time holds a run folder (docs/safety.md)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from layerprune import LayerpruneError
from layerprune.cli import app
from layerprune.config import load_run_config
from layerprune.files.outputs import MARKER
from layerprune.runs.pipeline import run_pipeline
from layerprune.runs.lock import LOCK_FILE, run_folder_lock
from cli_asserts import assert_one_line_error
from test_pipeline import make_workspace, write_config

HEAL = {"method": "partial", "max_steps": 4, "save_steps": 1, "batch_size": 4, "effective_batch_size": 4,
        "warmup_steps": 0, "max_length": 64, "bf16": False, "train_last_layers": 1}


@pytest.fixture
def workspace(tmp_path):
    return make_workspace(tmp_path)


def quiet(message):
    pass


def dropped(model_dir) -> list[int]:
    return json.loads((model_dir / "layerprune.json").read_text())["dropped_layers"]


def stale_names(run) -> set[str]:
    return {p.name for batch in (run / "stale").iterdir() for p in batch.iterdir()}


def test_changed_learning_rate_never_resumes_the_old_checkpoint(workspace, monkeypatch):
    """Killed mid-heal at lr 1e-4, rerun with --set heal.0.learning_rate=5e-3: healing starts over, and the
    weights equal an uninterrupted run at 5e-3, as heal.json says."""
    heal = [{**HEAL, "data": str(workspace / "sft.jsonl"), "learning_rate": 1e-4}]
    prune = {"metric": "reverse-order", "num_layers": 2}
    clean = write_config(workspace, prune=prune, heal=heal, eval=None, bench=None, out=str(workspace / "clean"))
    run_pipeline(load_run_config(clean, sets=["heal.0.learning_rate=5e-3"]), log=quiet)

    step = torch.optim.AdamW.step
    steps = []

    def failing_step(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 3:
            raise RuntimeError("killed")
        return step(self, *args, **kwargs)

    path = write_config(workspace, prune=prune, heal=heal, eval=None, bench=None, out=str(workspace / "run"))
    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", failing_step)
        with pytest.raises(RuntimeError, match="killed"):
            run_pipeline(load_run_config(path), log=quiet)
    [old_work] = (workspace / "run").glob(".healed-1.checkpoints-*")
    steps.clear()
    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: steps.append(1) or step(self, *a, **k))
        run_pipeline(load_run_config(path, sets=["heal.0.learning_rate=5e-3"]), log=quiet)
    assert len(steps) == 4  # all four steps: nothing resumed from the lr 1e-4 checkpoint
    assert old_work.name in stale_names(workspace / "run")
    heal_json = json.loads((workspace / "run" / "healed-1" / "heal.json").read_text())
    assert heal_json["config"]["learning_rate"] == 5e-3
    a = load_file(workspace / "clean" / "healed-1" / "model.safetensors")
    b = load_file(workspace / "run" / "healed-1" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


def test_changed_drop_list_redoes_the_prune_and_every_stage_after_it(workspace):
    heal = [{**HEAL, "data": str(workspace / "sft.jsonl"), "learning_rate": 1e-3, "max_steps": 1}]
    path = write_config(workspace, prune={"drop": [1]}, heal=heal, eval=None, bench=None)
    run_pipeline(load_run_config(path), log=quiet)
    run = workspace / "run"
    assert dropped(run / "healed-1") == [1]
    messages = []
    run_pipeline(load_run_config(path, sets=["prune.drop=[3]"]), log=messages.append)
    assert dropped(run / "pruned") == dropped(run / "healed-1") == [3]
    assert yaml.safe_load((run / "config.yaml").read_text())["prune"]["drop"] == [3]
    assert "**3**" in (run / "report.md").read_text()
    assert any("prune.drop: [1] -> [3]" in m for m in messages), messages
    assert {"pruned", "selection.json", "healed-1", "report.md"} <= stale_names(run)
    [batch] = (run / "stale").iterdir()
    assert dropped(batch / "pruned") == [1]  # moved aside, not deleted


def test_a_stage_whose_settings_did_not_change_is_kept(workspace):
    evaluation = {"tasks": "none", "ppl": str(workspace / "text.txt"), "seq_len": 32, "ppl_windows": 2, "samples": False,
                  "original": False}
    path = write_config(workspace, prune={"drop": [1]}, heal=[], eval=evaluation, bench=None)
    run_pipeline(load_run_config(path), log=quiet)
    run = workspace / "run"
    pruned_stamp = (run / "pruned" / "model.safetensors").stat().st_mtime_ns
    windows = json.loads((run / "eval-final" / "eval.json").read_text())
    run_pipeline(load_run_config(path, sets=["eval.ppl_windows=3"]), log=quiet)
    assert (run / "pruned" / "model.safetensors").stat().st_mtime_ns == pruned_stamp
    assert json.loads((run / "eval-final" / "eval.json").read_text()) != windows
    assert stale_names(run) == {"stages.json", "eval-final", "report.md", "run.json", "layer_map.png"}

    run_pipeline(load_run_config(path, sets=["eval=null"]), log=quiet)  # a stage the config no longer has
    assert not (run / "eval-final").exists()
    assert "ppl" not in (run / "report.md").read_text()


def test_a_selection_that_fails_leaves_nothing_that_blocks_the_fixed_config(workspace):
    path = write_config(workspace, prune={"granularity": "attention", "drop": [9]}, heal=[], eval=None, bench=None)
    with pytest.raises(LayerpruneError, match="out of range"):
        run_pipeline(load_run_config(path), log=quiet)
    run = workspace / "run"
    assert not (run / "selection.json").exists() and not (run / "pruned").exists()
    summary = run_pipeline(load_run_config(path, sets=["prune.drop=[1]"]), log=quiet)
    assert summary["dropped"] == [1]
    assert json.loads((run / "selection.json").read_text())["dropped"] == [1]


HOLDER = textwrap.dedent("""
    import sys, time
    from layerprune.runs.lock import run_folder_lock
    with run_folder_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_second_run_on_a_folder_in_use_refuses_at_once(workspace):
    path = write_config(workspace, prune={"drop": [1]}, heal=[], eval=None, bench=None)
    run = workspace / "run"
    run.mkdir()
    (run / MARKER).write_text("")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = CliRunner().invoke(app, ["run", str(path)])
        assert_one_line_error(result, f"is in use by another layerprune run (pid {holder.pid} ")
        assert "--overwrite" not in result.stderr
        assert sorted(p.name for p in run.iterdir()) == [LOCK_FILE, MARKER]  # it wrote nothing
    finally:
        holder.kill()
        holder.wait()
    assert str(holder.pid) in (run / LOCK_FILE).read_text()  # the dead holder's lock file stays behind...
    summary = run_pipeline(load_run_config(path), log=quiet)  # ...and does not block the next run
    assert summary["dropped"] == [1]


def test_a_study_folder_in_use_is_refused(workspace):
    from layerprune.runs.study import load_study

    study_yaml = workspace / "study.yaml"
    study_yaml.write_text(yaml.safe_dump({"model": str(workspace / "tiny"), "out": str(workspace / "study"),
                                          "prune": {"metric": "reverse-order", "num_layers": 1},
                                          "grid": {"metric": ["reverse-order", "block-influence"]}}))
    (workspace / "study").mkdir()
    with run_folder_lock(workspace / "study"):
        with pytest.raises(LayerpruneError, match="in use by another layerprune run"):
            load_study(study_yaml).execute(log=quiet)
    assert not (workspace / "study" / "settings").exists()


@pytest.mark.parametrize("out, fragment", [
    ("tiny", "is the input"),
    (".", "holds the input"),
    ("notes", "holds files that layerprune did not write"),
])
def test_a_run_folder_must_not_hold_the_model_or_someone_elses_files(workspace, out, fragment):
    (workspace / "notes").mkdir()
    (workspace / "notes" / "todo.txt").write_text("mine")
    path = write_config(workspace, prune={"drop": [1]}, heal=[], eval=None, bench=None, out=str(workspace / out))
    before = sorted(p.name for p in workspace.rglob("*"))
    with pytest.raises(LayerpruneError, match=fragment) as refused:
        run_pipeline(load_run_config(path), log=quiet)
    assert "--overwrite" not in str(refused.value)
    assert sorted(p.name for p in workspace.rglob("*")) == before
