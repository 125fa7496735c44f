"""The user cache shared by two processes at once, and cache entries that are not whole (files/cache.py).

Two processes making the same entries and different ones at the same time each read back every entry as it
should be; an entry cut short or missing a file is made again, never used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from layerprune.files.cache import MANIFEST, folder_is_whole, publish_file, publish_folder
from layerprune.finetune.teacher import compute_teacher_targets, teacher_targets
from layerprune.models.fingerprint import file_digests
from tiny_models import tiny_input, tiny_model

SRC = Path(__file__).resolve().parent.parent / "src"
TESTS = Path(__file__).resolve().parent

# Each writer makes entries 0-11 (both make them: the same names, the same bytes) and 12 of its own, files and
# folders alike, writing each in slow pieces so the two overlap; then it says "done".
WRITER = r"""
import sys, time
from pathlib import Path
from layerprune.files.cache import publish_file, publish_folder

root, me = Path(sys.argv[1]), sys.argv[2]

def content(name):
    return (name * 20000).encode()

def slowly(path, data):
    with open(path, "wb") as f:
        for start in range(0, len(data), len(data) // 8):
            f.write(data[start:start + len(data) // 8])
            f.flush()
            time.sleep(0.002)

def fill(name):
    def write(folder):
        slowly(folder / "a.bin", content(name))
        (folder / "sub").mkdir()
        slowly(folder / "sub" / "b.bin", content(name + "-b"))
    return write

names = [f"shared{i}" for i in range(12)] + [f"{me}{i}" for i in range(12)]
for name in names:
    publish_file(root / "files" / name, lambda tmp, name=name: slowly(tmp, content(name)))
    publish_folder(root / "folders" / name, fill(name))
print("done")
"""


def content(name: str) -> bytes:
    return (name * 20000).encode()


def run_together(script: str, *args_per_process: list[str], env: dict | None = None) -> list[str]:
    """Start one process per argument list at once; wait for all; their stdout (each must exit 0)."""
    environment = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{TESTS}", **(env or {})}
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=environment) for args in args_per_process]
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        outputs.append(out)
    return outputs


def test_two_processes_writing_the_same_and_different_entries_each_read_back_whole(tmp_path):
    outputs = run_together(WRITER, [str(tmp_path), "one"], [str(tmp_path), "two"])
    assert [o.strip() for o in outputs] == ["done", "done"]
    names = [f"shared{i}" for i in range(12)] + [f"{me}{i}" for me in ("one", "two") for i in range(12)]
    for name in names:
        assert (tmp_path / "files" / name).read_bytes() == content(name), name
        folder = tmp_path / "folders" / name
        assert folder_is_whole(folder), name
        assert (folder / "a.bin").read_bytes() == content(name)
        assert (folder / "sub" / "b.bin").read_bytes() == content(name + "-b")
    leftovers = [p.name for p in (tmp_path / "files").iterdir()] + [p.name for p in (tmp_path / "folders").iterdir()]
    assert sorted(leftovers) == sorted(names * 2)  # no temporary file or folder stays


def fill_counting(calls: list, data: bytes = b"weights" * 1000):
    def fill(folder: Path) -> None:
        calls.append(folder)
        (folder / "model.bin").write_bytes(data)
        (folder / "config.json").write_text("{}")
    return fill


@pytest.mark.parametrize("damage", ["cut short", "file lost", "manifest lost", "manifest of words", "grown"])
def test_a_cached_folder_that_is_not_whole_is_made_again_not_used(tmp_path, damage):
    calls = []
    entry = publish_folder(tmp_path / "entry", fill_counting(calls))
    assert len(calls) == 1 and folder_is_whole(entry)
    assert publish_folder(entry, fill_counting(calls)) == entry and len(calls) == 1  # whole: used as it is
    if damage == "cut short":
        os.truncate(entry / "model.bin", 100)
    elif damage == "file lost":
        (entry / "config.json").unlink()
    elif damage == "manifest lost":
        (entry / MANIFEST).unlink()
    elif damage == "manifest of words":
        (entry / MANIFEST).write_text("not json")
    else:
        with open(entry / "model.bin", "ab") as f:
            f.write(b"more")
    assert not folder_is_whole(entry)
    publish_folder(entry, fill_counting(calls))
    assert len(calls) == 2 and folder_is_whole(entry)
    assert (entry / "model.bin").read_bytes() == b"weights" * 1000 and (entry / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["entry"]  # the damaged one moved aside and removed


def test_a_failed_cache_write_leaves_nothing(tmp_path):
    def fails(path):
        Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        publish_file(tmp_path / "entry", fails)
    with pytest.raises(OSError):
        publish_folder(tmp_path / "folder", lambda folder: fails(folder / "x"))
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ the teacher's targets, two processes
TEACHER = r"""
import sys
from pathlib import Path
import torch
from layerprune.finetune.teacher import teacher_targets
from layerprune.models.loading import load_model
from tiny_models import tiny_input

folder, cache, seeds = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(",")]
teacher = load_model(folder, dtype="fp32").model
for seed in seeds:
    data = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in tiny_input(batch=6, length=12, seed=seed)]
    teacher_targets(teacher, data, 8, pad_id=0, cache_dir=cache)
print("done")
"""


def rows(seed: int) -> list[dict]:
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in tiny_input(batch=6, length=12, seed=seed)]


def test_two_processes_caching_teacher_targets_at_once_leave_every_entry_right(tmp_path):
    folder, cache = tmp_path / "teacher", tmp_path / "cache"
    tiny_model("llama").save_pretrained(folder)
    run_together(TEACHER, [str(folder), str(cache), "1,2,3,4"], [str(folder), str(cache), "1,2,5,6"])
    from layerprune.models.loading import load_model

    teacher = load_model(str(folder), dtype="fp32").model
    for seed in (1, 2, 3, 4, 5, 6):
        cached, hit = teacher_targets(teacher, rows(seed), 8, pad_id=0, cache_dir=cache)
        values, indices, offsets = compute_teacher_targets(teacher, rows(seed), 8, pad_id=0)
        assert hit, seed
        assert torch.equal(cached.values, values) and torch.equal(cached.indices, indices), seed
        assert torch.equal(cached.offsets, offsets)
    names = sorted(p.name for p in cache.iterdir())
    assert names == ["file-digests.json"] + sorted(n for n in names if n.startswith("teacher-top")) and len(names) == 7
    assert json.loads((cache / "file-digests.json").read_text())  # whole JSON, whichever process wrote it last


def test_a_damaged_file_digest_record_costs_a_hash_not_an_error(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x" * 1000)
    right = file_digests([weights], tmp_path)[0]
    record = tmp_path / "file-digests.json"
    for damaged in ({str(weights): {"size": 1000, "mtime_ns": weights.stat().st_mtime_ns}},  # no digest
                    {str(weights): {"size": 1000, "mtime_ns": weights.stat().st_mtime_ns, "sha256": "0" * 63}},
                    {str(weights): {"size": 1000, "mtime_ns": weights.stat().st_mtime_ns, "sha256": ["a"]}},
                    ["not", "a", "record"]):
        record.write_text(json.dumps(damaged))
        assert file_digests([weights], tmp_path) == [right]
    record.write_text('{"cut short')
    assert file_digests([weights], tmp_path) == [right]


# ------------------------------------------------------------------ converted GGUF files
LOAD_GGUF = r"""
import sys
from layerprune.models.loading import load_model
model = load_model(sys.argv[1], dtype="fp32", load_tokenizer=False).model
print(float(sum(p.double().sum() for p in model.parameters())))
"""


def converted_entries(cache: Path) -> list[Path]:
    return sorted(p for p in (cache / "models").iterdir() if not p.name.startswith(("file-digests", ".")))


def test_two_processes_converting_one_gguf_at_once_both_load_it(tmp_path):
    from gguf_files import write_gguf

    gguf = write_gguf(tmp_path / "m.gguf", "llama")
    cache = tmp_path / "cache"
    sums = run_together(LOAD_GGUF, [str(gguf)], [str(gguf)], env={"LAYERPRUNE_CACHE": str(cache)})
    assert float(sums[0].split()[-1]) == float(sums[1].split()[-1])
    [entry] = converted_entries(cache)
    assert folder_is_whole(entry)


def test_a_converted_gguf_cut_short_is_converted_again_not_loaded(tmp_path, monkeypatch):
    from gguf_files import write_gguf
    from layerprune.models.loading import load_model

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    gguf = write_gguf(tmp_path / "m.gguf", "llama")
    model = load_model(str(gguf), dtype="fp32", load_tokenizer=False).model
    first = {name: t.clone() for name, t in model.state_dict().items()}  # the weights may be mapped from the file
    del model
    [entry] = converted_entries(tmp_path / "cache")
    weights = entry / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    again = load_model(str(gguf), dtype="fp32", load_tokenizer=False).model
    assert converted_entries(tmp_path / "cache") == [entry] and folder_is_whole(entry)
    assert list(first) == list(again.state_dict())
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, first[name]), name


def test_a_gguf_changed_in_place_is_converted_anew(tmp_path, monkeypatch):
    from gguf_files import write_gguf
    from layerprune.models.loading import load_model

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    gguf = write_gguf(tmp_path / "m.gguf", "llama", seed=0)
    first = load_model(str(gguf), dtype="fp32", load_tokenizer=False).model
    stat = gguf.stat()
    write_gguf(gguf, "llama", seed=1)
    os.utime(gguf, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # another content: a new entry
    second = load_model(str(gguf), dtype="fp32", load_tokenizer=False).model
    assert len(converted_entries(tmp_path / "cache")) == 2
    assert not torch.equal(next(first.parameters()), next(second.parameters()))


# ------------------------------------------------------------------ a built-in model assembled from chunks
def test_an_assembled_builtin_gguf_cut_short_is_assembled_again(tmp_path, monkeypatch):
    import hashlib

    from layerprune.models import builtin

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    package = tmp_path / "cache" / "packages" / "fake_parts"
    package.mkdir(parents=True)
    (package / "part0").write_bytes(b"a" * 5000)
    (package / "part1").write_bytes(b"b" * 3000)
    whole = b"a" * 5000 + b"b" * 3000
    spec = builtin.BuiltinModel(alias="fake", description="", packages=(("fake-parts==1", "fake_parts"),),
                                chunks=("fake_parts/part0", "fake_parts/part1"), gguf_name="fake.gguf",
                                sha256=hashlib.sha256(whole).hexdigest())
    monkeypatch.setitem(builtin.BUILTIN_MODELS, "fake", spec)
    path = builtin.builtin_gguf_path("fake")
    assert path.read_bytes() == whole
    os.truncate(path, 4000)
    assert builtin.builtin_gguf_path("fake").read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["fake.gguf"]
