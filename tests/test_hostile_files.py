"""Hostile file layouts: layerprune deletes or replaces only what it created, never writes through a symlink
it did not make, and keeps every side folder (checkpoints, study folders, settings) inside what it claimed
(docs/safety.md)."""

import contextlib
import hashlib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from layerprune import LayerpruneError
from layerprune.cli import app
from layerprune.config import load_run_config
from layerprune.files.outputs import MARKER
from layerprune.runs.lock import LOCK_FILE
from layerprune.runs.pipeline import run_pipeline
from layerprune.runs.study import load_study
from cli_asserts import assert_one_line_error
from test_pipeline import make_workspace, write_config

runner = CliRunner()
HEAL = ["--method", "partial", "--max-steps", "1", "--batch-size", "2", "--max-length", "32", "--no-bf16",
        "--train-last-layers", "1", "--warmup-steps", "0"]


@pytest.fixture
def workspace(tmp_path):
    return make_workspace(tmp_path)


def tree(folder: Path) -> dict:
    """Every file under `folder` with a digest of its bytes: equal trees mean nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def finetune(*args):
    return runner.invoke(app, ["finetune", *map(str, args)])


# ------------------------------------------------------------------ finetune's checkpoint folder
def test_finetune_never_deletes_a_checkpoints_folder_it_did_not_make(workspace):
    work = workspace / "healed.checkpoints"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    result = finetune(workspace / "tiny", "--out", workspace / "healed", "--data", workspace / "sft.jsonl", *HEAL)
    assert_one_line_error(result, "healed.checkpoints")
    assert (work / "thesis.tex").read_text() == "years of work"
    assert not (workspace / "healed").exists()


def test_finetune_never_deletes_its_input_model_named_like_its_checkpoints(workspace):
    model = workspace / "mm.checkpoints"
    (workspace / "tiny").rename(model)
    (model / MARKER).write_text("")  # a pruned model: itself a layerprune output
    before = tree(model)
    result = finetune(model, "--out", workspace / "mm", "--data", workspace / "sft.jsonl", *HEAL)
    assert_one_line_error(result, "mm.checkpoints")
    assert tree(model) == before


def test_finetune_never_deletes_its_teacher_named_like_its_checkpoints(workspace):
    teacher = workspace / "tt.checkpoints"
    (workspace / "tiny").rename(teacher)
    (workspace / "tiny").symlink_to(teacher)  # the student: the same weights under another path
    before = tree(teacher)
    result = finetune(workspace / "tiny", "--out", workspace / "tt", "--data", workspace / "sft.jsonl",
                      "--teacher", teacher,
                      *[a if a != "partial" else "distill" for a in HEAL])
    assert_one_line_error(result, "tt.checkpoints")
    assert tree(teacher) == before


def test_finetune_never_follows_a_symlinked_checkpoints_folder(workspace):
    victim = workspace / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    (workspace / "healed.checkpoints").symlink_to(victim)
    result = finetune(workspace / "tiny", "--out", workspace / "healed", "--data", workspace / "sft.jsonl", *HEAL)
    assert_one_line_error(result, "healed.checkpoints")
    assert tree(victim) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}


def test_finetune_removes_the_checkpoints_folder_it_made(workspace):
    result = finetune(workspace / "tiny", "--out", workspace / "healed", "--data", workspace / "sft.jsonl",
                      *HEAL, "--save-steps", "1")
    assert result.exit_code == 0, result.output
    assert (workspace / "healed" / "model.safetensors").is_file()
    assert not (workspace / "healed.checkpoints").exists()


# ------------------------------------------------------------------ run folders: no write through a symlink
def fast_run(workspace, **overrides):
    config = {"prune": {"drop": [1]}, "heal": [], "eval": None, "bench": None, **overrides}
    return load_run_config(write_config(workspace, **config))


@pytest.mark.parametrize("name", [LOCK_FILE, "config.yaml", MARKER])
def test_a_run_never_writes_through_a_symlink_in_its_folder(workspace, name):
    config = fast_run(workspace)
    run = Path(config.out)
    run.mkdir()
    (run / MARKER).write_text("")
    victim = workspace / "victim.txt"
    victim.write_text("precious")
    (run / name).unlink(missing_ok=True)
    (run / name).symlink_to(victim)
    try:
        run_pipeline(config, log=lambda m: None)
    except LayerpruneError as err:
        assert name in str(err)
    assert victim.read_text() == "precious"


# ------------------------------------------------------------------ study folders
def study_file(workspace, **overrides) -> Path:
    path = write_config(workspace, bench=None, eval=None, heal=[])
    data = yaml.safe_load(path.read_text())
    data.update({"prune": {"metric": "reverse-order", "num_layers": 1}, "out": str(workspace / "study"),
                 "grid": {"metric": ["reverse-order"]}}, **overrides)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_a_study_never_writes_into_a_folder_it_did_not_make(workspace):
    foreign = workspace / "study"
    foreign.mkdir()
    (foreign / "study.md").write_text("my own study")
    with pytest.raises(LayerpruneError, match="did not write"):
        load_study(study_file(workspace)).execute(log=lambda m: None)
    assert tree(foreign) == {"study.md": hashlib.sha256(b"my own study").hexdigest()}


def test_a_study_never_writes_into_its_model(workspace):
    before = tree(workspace / "tiny")
    with pytest.raises(LayerpruneError, match="input"):
        load_study(study_file(workspace, out=str(workspace / "tiny"))).execute(log=lambda m: None)
    assert tree(workspace / "tiny") == before


def test_a_study_never_writes_through_a_symlinked_report(workspace):
    victim = workspace / "victim.md"
    victim.write_text("precious")
    study = workspace / "study"
    study.mkdir()
    (study / MARKER).write_text("")
    (study / "study.md").symlink_to(victim)
    load_study(study_file(workspace)).execute(log=lambda m: None)
    assert victim.read_text() == "precious"
    assert not (study / "study.md").is_symlink() and "reverse" in (study / "study.md").read_text()


@pytest.mark.parametrize("axis", ["prune.metric_params.x.{tmp}/escaped", "prune.metric_params.x.sub/{tmp}/escaped"])
def test_a_grid_axis_never_names_a_folder_outside_the_study(workspace, axis):
    """An axis name ending in an absolute path once made the setting's run folder at that path."""
    axis = axis.format(tmp=workspace / "outside")
    study = load_study(study_file(workspace, grid={axis: [1]}))
    for setting in study.settings:
        assert (workspace / "study" / "settings").resolve() in Path(setting["config"].out).resolve().parents
    with contextlib.suppress(LayerpruneError):  # the setting itself may fail (x is no metric): not the point
        study.execute(log=lambda m: None)
    assert not (workspace / "outside").exists()


# ------------------------------------------------------------------ more of an attacker's layouts
def test_a_symlinked_marker_does_not_make_a_folder_layerprunes(workspace):
    """A foreign folder whose .layerprune-output is a link to some marker is not layerprune's to replace."""
    from layerprune.files.outputs import atomic_output_dir

    owned = workspace / "owned"
    owned.mkdir()
    (owned / MARKER).write_text("")
    foreign = workspace / "foreign"
    foreign.mkdir()
    (foreign / "data.csv").write_text("1,2,3")
    (foreign / MARKER).symlink_to(owned / MARKER)
    with pytest.raises(LayerpruneError, match="was not written by layerprune"):
        with atomic_output_dir(foreign, overwrite=True):
            pass
    assert (foreign / "data.csv").read_text() == "1,2,3"


def test_earlier_outputs_are_never_moved_through_a_symlinked_stale_folder(workspace):
    config = fast_run(workspace)
    run_pipeline(config, log=lambda m: None)
    elsewhere = workspace / "elsewhere"
    elsewhere.mkdir()
    (Path(config.out) / "stale").symlink_to(elsewhere)
    changed = fast_run(workspace, prune={"drop": [2]})
    with pytest.raises(LayerpruneError, match="stale"):
        run_pipeline(changed, log=lambda m: None)
    assert list(elsewhere.iterdir()) == []
    assert (Path(config.out) / "pruned" / "model.safetensors").is_file()
