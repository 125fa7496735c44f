"""Refused work leaves nothing behind (docs/safety.md): a `finetune` refused for its data or its budget after
claiming its checkpoints' folder removes that folder; one that already holds checkpoints stays for --resume."""

import json

import pytest
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.files.work_dirs import WORK_MARKER, claim_work_dir, removed_unless_used
from cli_asserts import assert_one_line_error
from test_pipeline import make_workspace

runner = CliRunner()


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    return make_workspace(tmp_path)


def write_bad_data(workspace):
    (workspace / "bad.jsonl").write_text(json.dumps({"instruction": "say hi", "answer": "hi"}) + "\n")
    return workspace / "bad.jsonl"


@pytest.mark.parametrize("case", ["missing field", "bad weight", "tiny budget"])
def test_a_refused_finetune_leaves_no_checkpoint_folder(workspace, case):
    data = {"missing field": write_bad_data(workspace), "bad weight": "c4:-1"}.get(case, workspace / "sft.jsonl")
    extra = ["--max-minutes", "1e-9"] if case == "tiny budget" else []
    result = runner.invoke(app, ["finetune", str(workspace / "tiny"), "--out", str(workspace / "healed"),
                                 "--data", str(data), "--method", "lora", "--max-steps", "2", *extra])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert not (workspace / "healed").exists()
    assert not (workspace / "healed.checkpoints").exists(), "an empty checkpoints folder was left behind"


def test_a_work_folder_with_checkpoints_stays_for_resume(tmp_path):
    folder = tmp_path / "out.checkpoints"
    claim_work_dir(folder, {"a": 1})
    (folder / "checkpoint-1").mkdir()
    with pytest.raises(RuntimeError), removed_unless_used(folder):
        raise RuntimeError("the heal failed after its first checkpoint")
    assert (folder / "checkpoint-1").is_dir() and (folder / WORK_MARKER).is_file()
    empty = tmp_path / "other.checkpoints"
    claim_work_dir(empty, {"a": 1})
    with pytest.raises(RuntimeError), removed_unless_used(empty):
        raise RuntimeError("refused before any step")
    assert not empty.exists()
    mine = tmp_path / "mine"  # a folder layerprune did not make is never removed
    mine.mkdir()
    with pytest.raises(RuntimeError), removed_unless_used(mine):
        raise RuntimeError("x")
    assert mine.is_dir()
