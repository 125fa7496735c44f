"""Outputs never replace an input or a folder layerprune did not write, appear atomically, and leave nothing
behind on failure, SIGTERM, SIGINT or kill -9 (docs/safety.md)."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

import layerprune.files.renames as renames
from layerprune import LayerpruneError, save_model
from layerprune.cli import app
from layerprune.files.outputs import MARKER, atomic_output_dir, check_output_dir, write_json
from tiny_models import tiny_model, tiny_tokenizer
from cli_asserts import assert_one_line_error

runner = CliRunner()


def tree(folder: Path) -> dict:
    """Every file under `folder` with a digest of its bytes: equal trees mean nothing was touched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if "layerprune-tmp" in p.name]


@pytest.fixture
def project(tmp_path):
    """proj/ (itself a layerprune output, so only the input check can protect it) holding a model and data."""
    proj = tmp_path / "proj"
    save_model(tiny_model("llama"), tiny_tokenizer(), proj / "model")
    (proj / MARKER).write_text("")
    data = tmp_path / "data"
    data.mkdir()
    (data / MARKER).write_text("")
    (data / "text.txt").write_text("the cat sat on the mat. " * 200)
    (data / "sft.jsonl").write_text(json.dumps({"instruction": "say hi", "context": "", "response": "hi"}) + "\n")
    return tmp_path


def command(name: str, model: Path, out: Path, data: Path) -> list[str]:
    extra = {
        "prune": ["--drop", "1", "--calib", str(data / "text.txt")],
        "finetune": ["--max-steps", "1", "--data", str(data / "sft.jsonl")],
        "eval": ["--ppl", str(data / "text.txt")],
        "bench": ["--device", "cpu"],
        "score": ["--metric", "reverse-order", "--calib", str(data / "text.txt")],
    }[name]
    return [name, str(model), "--out", str(out), "--overwrite", *extra]


PLACES = [
    ("model", "is the input"),            # --out equal to the input model
    ("proj", "holds the input"),          # --out a folder that holds the input model
    ("data", "holds the input"),          # --out the folder of an input data file (bench reads none)
    ("model/sub", "inside the input"),    # --out an existing folder inside the input model
]


@pytest.mark.parametrize("name, where, fragment", [
    (name, where, fragment) for name in ("prune", "finetune", "eval", "bench", "score")
    for where, fragment in PLACES if (name, where) != ("bench", "data")
])
def test_no_command_replaces_its_input_even_with_overwrite(project, name, where, fragment):
    proj, data = project / "proj", project / "data"
    model = proj / "model"
    (model / "sub").mkdir()
    (model / "sub" / MARKER).write_text("")
    out = {"model": model, "proj": proj, "data": data, "model/sub": model / "sub"}[where]
    before_model, before_data = tree(proj), tree(data)
    assert_one_line_error(runner.invoke(app, command(name, model, out, data)), fragment)
    assert tree(proj) == before_model and tree(data) == before_data
    assert not leftovers(out.parent)


def test_export_refuses_to_replace_a_file_of_its_input(project):
    model = project / "proj" / "model"
    (model / "old.gguf").write_bytes(b"GGUF")
    before = tree(model)
    result = runner.invoke(app, ["export", str(model), "--out", str(model / "old.gguf"), "--overwrite"])
    assert_one_line_error(result, "inside the input")
    assert tree(model) == before


def test_eval_compare_refuses_to_write_over_an_input(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "eval.json").write_text("{}")
    result = runner.invoke(app, ["eval-compare", str(tmp_path / "a"), str(tmp_path / "a"),
                                 "--out", str(tmp_path / "a" / "eval.json"), "--overwrite"])
    assert_one_line_error(result, "inside the input")
    assert (tmp_path / "a" / "eval.json").read_text() == "{}"


def test_overwrite_replaces_only_empty_or_layerprune_folders(tmp_path):
    empty, mine, theirs = tmp_path / "empty", tmp_path / "mine", tmp_path / "theirs"
    empty.mkdir()
    with atomic_output_dir(empty) as tmp:  # an empty folder is taken without --overwrite
        (tmp / "a.txt").write_text("a")
    with atomic_output_dir(mine) as tmp:
        (tmp / "a.txt").write_text("a")
    assert (mine / MARKER).is_file()
    with atomic_output_dir(mine, overwrite=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in mine.iterdir()) == [MARKER, "b.txt"]
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine, not layerprune's")
    with pytest.raises(LayerpruneError, match="was not written by layerprune"):
        check_output_dir(theirs, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "theirs"]


def test_current_folder_and_mount_points_are_refused_before_any_work(tmp_path, monkeypatch, project):
    work = tmp_path / "work"
    work.mkdir()
    (work / MARKER).write_text("")
    monkeypatch.chdir(work)
    model = project / "proj" / "model"
    assert_one_line_error(runner.invoke(app, ["prune", str(model), "--drop", "1", "--out", ".", "--overwrite"]),
                          "current folder")
    assert sorted(os.listdir(work)) == [MARKER] and not leftovers(tmp_path)
    if os.path.ismount("/proc"):
        with pytest.raises(LayerpruneError, match="mount point"):
            check_output_dir("/proc", overwrite=True)


def test_a_failed_move_into_place_leaves_nothing_behind(tmp_path, monkeypatch):
    def busy(src, dst):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY), str(dst))

    monkeypatch.setattr("layerprune.files.outputs.rename_noreplace", busy)
    with pytest.raises(LayerpruneError, match="cannot write the output .*busy"):
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("a")
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(params=["kernel", "fallback"])
def rename_kind(request, monkeypatch):
    """Run a test with the kernel's no-replace/exchange renames and with the fallback used without them."""
    if request.param == "fallback":
        monkeypatch.setattr(renames, "_RENAME", None)
    elif renames._RENAME is None:
        pytest.skip("no renameat2/renamex_np here")
    return request.param


def test_a_folder_created_during_the_write_is_never_deleted(tmp_path, rename_kind):
    out = tmp_path / "out"
    with pytest.raises(LayerpruneError, match="changed while the output was being written"):
        with atomic_output_dir(out) as tmp:
            (tmp / "ours.txt").write_text("ours")
            out.mkdir()  # another writer, meanwhile
            (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]


def test_overwrite_never_deletes_a_folder_swapped_in_during_the_write(tmp_path, rename_kind):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        (tmp / "old.txt").write_text("old")
    with pytest.raises(LayerpruneError, match="changed while"):
        with atomic_output_dir(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            out.rename(tmp_path / "moved-away")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moved-away", "out"]


def test_overwrite_writes_through_a_symlinked_output(tmp_path, rename_kind):
    real, link = tmp_path / "real", tmp_path / "link"
    with atomic_output_dir(real) as tmp:
        (tmp / "old.txt").write_text("old")
    link.symlink_to(real)
    with atomic_output_dir(link, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert sorted(p.name for p in real.iterdir()) == [MARKER, "new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_outputs_have_the_permissions_of_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "a.txt").write_text("a")
        written = write_json(tmp_path / "out.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert written.stat().st_mode & 0o777 == 0o640


WRITER = textwrap.dedent("""
    import os, signal, sys, time
    from layerprune.files.outputs import atomic_output_dir
    # a shell's background job starts with SIGINT ignored; give the writer Python's usual Ctrl-C behaviour
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with atomic_output_dir(sys.argv[1]) as tmp:
        (tmp / "half.txt").write_text("half written")
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
        time.sleep(30)  # the signal lands before this ends
""")


def write_and_signal(out: Path, sig: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WRITER, str(out), sig], capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_remove_the_temporary_folder(tmp_path, sig):
    result = write_and_signal(tmp_path / "out", sig)
    assert result.returncode != 0
    if sig == "SIGTERM":
        assert result.returncode == -signal.SIGTERM  # the signal still ends the process as it would have
    assert list(tmp_path.iterdir()) == [], result.stderr


def test_kill_9_leftovers_are_cleaned_by_the_next_write_but_live_writers_are_not(tmp_path):
    result = write_and_signal(tmp_path / "out", "SIGKILL")
    assert result.returncode == -signal.SIGKILL
    [dead] = leftovers(tmp_path)
    assert dead.startswith(".out.layerprune-tmp-")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as live:
        pid = dead.rsplit("-", 2)[1]
        alive = tmp_path / dead.replace(f"-{pid}-", f"-{live.pid}-")
        alive.mkdir()
        with atomic_output_dir(tmp_path / "out") as tmp:
            (tmp / "done.txt").write_text("done")
        names = sorted(p.name for p in tmp_path.iterdir())
        live.kill()
    assert names == sorted([alive.name, "out"])  # the dead writer's copy went, the live one's stayed
