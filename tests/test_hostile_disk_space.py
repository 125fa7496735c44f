"""The free-space check counts everything an output holds, not only its tensors (docs/safety.md): the
tokenizer (33 MB for Gemma 3's), the config, the model card and the provenance record of a model folder; a
GGUF's metadata; a heal's checkpoints. Each case: the output written once with room to spare gives its real
size; then a disk with room for its tensors but one byte short of the whole output is refused before anything
is written, in one line naming the output and its disk."""

from __future__ import annotations

import shutil
from collections import namedtuple
from pathlib import Path

import pytest
from typer.testing import CliRunner

from layerprune import save_model
from layerprune.cli import app
from cli_asserts import assert_one_line_error
from gguf_files import write_gguf
from tiny_models import tiny_model, tiny_tokenizer

runner = CliRunner()
Usage = namedtuple("Usage", "total used free")
HEAL = ["--method", "cpt", "--batch-size", "2", "--max-length", "32", "--no-bf16", "--warmup-steps", "0",
        "--data", "text.txt"]


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def disk_with(monkeypatch, free: int) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - free, free))


def sizes(path: Path) -> tuple[int, int]:
    """(every byte of the output, the bytes of its tensor files)."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in files)
    tensors = sum(p.stat().st_size for p in files if p.suffix in (".safetensors", ".gguf"))
    return total, tensors


def assert_error_line(result, fragment: str) -> None:
    """Exit 1 and one `error:` line at the end (a heal's progress bars may come before it), no traceback."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and fragment in lines[-1], result.stderr
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.output


def refused_for_want_of_room(monkeypatch, args, out: Path, tensors: int, whole: int) -> None:
    assert tensors * 1.01 < whole - 1  # the tensors alone fit: a check of the tensors only would write
    disk_with(monkeypatch, whole - 1)
    result = run(*args)
    if args[0] == "prune":
        assert_one_line_error(result, "not enough disk space for")
    else:
        assert_error_line(result, "not enough disk space for")
    assert str(out) in result.stderr and "free on the disk mounted at /" in result.stderr
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if ".layerprune-tmp" in p.name]


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    save_model(tiny_model("llama"), tiny_tokenizer(), folder)
    return folder


@pytest.mark.parametrize("on_disk", [False, True], ids=["in-memory", "no-load"])
def test_prune_refuses_a_disk_with_room_for_the_tensors_but_not_the_folder(model_dir, tmp_path, monkeypatch, on_disk):
    args = ["prune", model_dir, "--drop", "1", "--out"]
    extra = ["--no-load"] if on_disk else []
    assert run(*args, tmp_path / "roomy", *extra).exit_code == 0
    whole, tensors = sizes(tmp_path / "roomy")
    refused_for_want_of_room(monkeypatch, [*args, tmp_path / "tight", *extra], tmp_path / "tight", tensors, whole)


def test_prune_to_gguf_counts_the_metadata(tmp_path, monkeypatch):
    source = write_gguf(tmp_path / "model.gguf", "llama", n_blocks=4)
    assert run("prune", source, "--drop", "1", "--out", tmp_path / "roomy.gguf").exit_code == 0
    whole = (tmp_path / "roomy.gguf").stat().st_size
    from layerprune.models.gguf_file import reader

    tensors = sum(int(t.n_bytes) for t in reader(tmp_path / "roomy.gguf").tensors)
    refused_for_want_of_room(monkeypatch, ["prune", source, "--drop", "1", "--out", tmp_path / "tight.gguf"],
                             tmp_path / "tight.gguf", tensors, whole)


def test_finetune_refuses_a_disk_without_room_for_the_healed_folder(model_dir, tmp_path, monkeypatch, corpus_file):
    monkeypatch.chdir(tmp_path)
    assert run("finetune", model_dir, *HEAL, "--max-steps", "1", "--out", tmp_path / "roomy").exit_code == 0
    whole, tensors = sizes(tmp_path / "roomy")
    refused_for_want_of_room(monkeypatch, ["finetune", model_dir, *HEAL, "--max-steps", "1", "--out",
                                           tmp_path / "tight"], tmp_path / "tight", tensors, whole)
    assert not (tmp_path / "tight.checkpoints").exists()  # refused after healing: the work folder goes too


def test_finetune_counts_every_checkpoint_before_the_first_step(model_dir, tmp_path, monkeypatch, corpus_file):
    monkeypatch.chdir(tmp_path)
    from layerprune.files import work_dirs

    seen = {}
    keep = work_dirs.shutil.rmtree

    def measure_then_remove(path, *args, **kwargs):  # the checkpoints folder, measured before it goes
        if str(path).endswith(".checkpoints"):
            seen["bytes"] = sizes(Path(path))[0]
        return keep(path, *args, **kwargs)

    monkeypatch.setattr(work_dirs.shutil, "rmtree", measure_then_remove)
    steps = ["--max-steps", "3", "--save-steps", "1"]
    assert run("finetune", model_dir, *HEAL, *steps, "--out", tmp_path / "roomy").exit_code == 0
    checkpoints, healed = seen["bytes"], sizes(tmp_path / "roomy")[0]
    assert checkpoints > 3 * healed  # three checkpoints, each the weights and AdamW's two states
    disk_with(monkeypatch, healed * 2)  # room for the output and the checkpoints of one save, not of three
    result = run("finetune", model_dir, *HEAL, *steps, "--out", tmp_path / "tight")
    assert_error_line(result, "not enough disk space for 3 checkpoints of healing (one every 1 steps)")
    assert f"{tmp_path / 'tight.checkpoints'}" in result.stderr and "mounted at /" in result.stderr
    assert not (tmp_path / "tight").exists() and not (tmp_path / "tight.checkpoints").exists()
