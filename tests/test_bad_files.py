"""Every bad input file is one `error:` line naming it (and the line or byte), never a traceback.

Text files (calibration, perplexity, tasks, healing data, YAML) that are not UTF-8, JSONL lines that are not
objects, corrupt gzip copies, folders given for files; truncated safetensors and GGUF files, refused pickles;
full and read-only disks; and values that must be refused before any model loads.
"""

import errno
import gzip
import json
import os

import pytest
import yaml
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.files.user_files import iter_jsonl, read_text
from tiny_models import tiny_model
from cli_asserts import assert_one_line_error

runner = CliRunner()
TEXT = "\n\n".join(f"the {w} sat on the mat and looked at the {v}." for w in ("cat", "dog") for v in ("sun", "sea"))
NOT_UTF8 = "caf\u00e9 ".encode("latin-1") + b"au lait\n"  # 0xe9 at byte offset 3


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def write(path, data: bytes):
    path.write_bytes(data)
    return path


def truncated_gzip(path, text: str = TEXT):
    return write(path, gzip.compress(text.encode())[:-12])


# ------------------------------------------------------------------ the reading layer


def test_read_text_names_the_byte_offset_and_line(tmp_path):
    path = write(tmp_path / "a.txt", b"ok line\n" + NOT_UTF8)
    with pytest.raises(LayerpruneError, match=r"a.txt is not UTF-8 text: byte 0xe9 at offset 11"):
        read_text(path)
    path = write(tmp_path / "a.jsonl", b'{"a": 1}\n' + NOT_UTF8)
    with pytest.raises(LayerpruneError, match=r"a.jsonl is not UTF-8 text: byte 0xe9 at offset 12 \(line 2\)"):
        list(iter_jsonl(path))
    assert read_text(write(tmp_path / "bom.txt", b"\xef\xbb\xbfhello")) == "hello"


@pytest.mark.parametrize("line, fragment", [
    (b"[1, 2]", "a.jsonl:2 is not a JSON object (it is a JSON list)"),
    (b'"text"', "a.jsonl:2 is not a JSON object (it is a JSON string)"),
    (b"{nope", "a.jsonl:2 is not valid JSON"),
])
def test_jsonl_lines_must_be_objects(tmp_path, line, fragment):
    path = write(tmp_path / "a.jsonl", b'{"text": "fine"}\n' + line + b"\n")
    with pytest.raises(LayerpruneError, match=r".*" + fragment.replace("(", r"\(").replace(")", r"\)")):
        list(iter_jsonl(path))


def test_gzip_files_are_read_and_corrupt_ones_named(tmp_path):
    assert read_text(write(tmp_path / "a.txt.gz", gzip.compress(b"hello"))) == "hello"
    for bad in (truncated_gzip(tmp_path / "cut.txt.gz"), write(tmp_path / "junk.txt.gz", b"not gzip at all")):
        with pytest.raises(LayerpruneError, match=f"{bad.name} is not a valid gzip file"):
            read_text(bad)
    lines = "\n".join(json.dumps({"text": f"document {i}"}) for i in range(2000)).encode()
    cut = write(tmp_path / "cut.jsonl.gz", gzip.compress(lines)[:-40])
    with pytest.raises(LayerpruneError, match="cut.jsonl.gz is not a valid gzip file"):
        list(iter_jsonl(cut))  # read line by line: the error surfaces mid-stream


def test_folders_and_missing_files_are_named(tmp_path):
    with pytest.raises(LayerpruneError, match="is a folder, not a config file"):
        read_text(tmp_path, "config file")
    with pytest.raises(LayerpruneError, match="config file not found"):
        read_text(tmp_path / "nowhere.yaml", "config file")


# ------------------------------------------------------------------ text files through the CLI


def prune_with_calibration(tiny_dir, tmp_path, calib):
    return run("prune", tiny_dir, "--num-layers", "1", "--calib", calib, "--n-samples", "1", "--seq-len", "8",
               "--out", tmp_path / "out")


def test_calibration_text_that_is_not_utf8(tiny_dir, tmp_path):
    result = prune_with_calibration(tiny_dir, tmp_path, write(tmp_path / "calib.txt", NOT_UTF8))
    assert_one_line_error(result, "calib.txt is not UTF-8 text: byte 0xe9 at offset 3")
    assert not (tmp_path / "out").exists()


def test_calibration_jsonl_line_that_is_not_an_object(tiny_dir, tmp_path):
    calib = write(tmp_path / "calib.jsonl", json.dumps({"text": TEXT}).encode() + b'\n["a list"]\n')
    assert_one_line_error(prune_with_calibration(tiny_dir, tmp_path, calib), "calib.jsonl:2 is not a JSON object")


def test_calibration_corrupt_gzip_is_one_line_not_aborted(tiny_dir, tmp_path):
    result = prune_with_calibration(tiny_dir, tmp_path, truncated_gzip(tmp_path / "calib.txt.gz"))
    assert_one_line_error(result, "calib.txt.gz is not a valid gzip file")
    assert "Aborted" not in result.output


@pytest.mark.parametrize("name, data, args", [
    ("quiz.jsonl", NOT_UTF8, ["--tasks", "{}", "--ppl", "none"]),
    ("task.yaml", NOT_UTF8, ["--tasks", "{}", "--ppl", "none"]),
    ("text.txt", NOT_UTF8, ["--ppl", "{}"]),
    ("text.jsonl", b'{"text": "a"}\n' + NOT_UTF8, ["--ppl", "{}"]),
])
def test_eval_files_that_are_not_utf8(tiny_dir, tmp_path, name, data, args):
    path = write(tmp_path / name, data)
    result = run("eval", tiny_dir, "--out", tmp_path / "out", *[a.format(path) for a in args])
    assert_one_line_error(result, f"{name} is not UTF-8 text: byte 0xe9 at offset")
    assert not (tmp_path / "out").exists()


def test_perplexity_text_in_a_corrupt_gzip(tiny_dir, tmp_path):
    result = run("eval", tiny_dir, "--out", tmp_path / "out", "--ppl", truncated_gzip(tmp_path / "text.txt.gz"))
    assert_one_line_error(result, "text.txt.gz is not a valid gzip file")


@pytest.mark.parametrize("data, fragment", [
    (NOT_UTF8, "heal.jsonl is not UTF-8 text: byte 0xe9 at offset 3"),
    (b'{"instruction": "a", "response": "b"}\n7\n', "heal.jsonl:2 is not a JSON object"),
])
def test_healing_data(tiny_dir, tmp_path, data, fragment):
    path = write(tmp_path / "heal.jsonl", data)
    # lora: the default (distill) would first ask for a teacher, which a bare tiny model has none of
    result = run("finetune", tiny_dir, "--method", "lora", "--data", path, "--max-steps", "1", "--out", tmp_path / "out")
    assert_one_line_error(result, fragment)


def test_instruction_json_lists_hold_objects(tmp_path):
    from layerprune.data.instructions import load_examples

    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, ["not", "a", "record"]]))
    with pytest.raises(LayerpruneError, match="alpaca.json: record 2 of the list is not a JSON object"):
        load_examples(str(path))
    with pytest.raises(LayerpruneError, match="is a folder"):
        load_examples(str(tmp_path))


def test_yaml_files_that_are_not_utf8_or_are_folders(tmp_path):
    assert_one_line_error(run("run", write(tmp_path / "run.yaml", b"model: " + NOT_UTF8)),
                          "run.yaml is not UTF-8 text: byte 0xe9 at offset 10")
    (tmp_path / "folder.yaml").mkdir()
    assert_one_line_error(run("run", tmp_path / "folder.yaml"), "folder.yaml is a folder, not a config file")
    assert_one_line_error(run("finetune", "nowhere", "--config", tmp_path / "folder.yaml", "--out", tmp_path / "o"),
                          "is a folder")


# ------------------------------------------------------------------ weight files


def truncate(path, keep: int):
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize("keep", [100, 2000])  # inside the header; inside the tensor data
def test_truncated_safetensors(tiny_dir, tmp_path, keep):
    weights = tiny_dir / "model.safetensors"
    truncate(weights, keep if keep < 1000 else weights.stat().st_size - keep)
    for args in (["info", tiny_dir], ["prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out"],
                 ["prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out", "--no-load"],
                 ["score", tiny_dir, "--streaming", "--metric", "magnitude-l1", "--out", tmp_path / "scores"]):
        assert_one_line_error(run(*args), "model.safetensors is truncated")
    assert not (tmp_path / "out").exists() and not (tmp_path / "scores").exists()


def test_gguf_cut_inside_its_header(tmp_path, monkeypatch):
    import numpy as np
    import gguf

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_string("general.name", "tiny" * 20)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    truncate(path, 60)
    assert_one_line_error(run("info", path), "model.gguf as a GGUF model: it is truncated or corrupt")


def test_pickle_weights_refused_by_weights_only_are_one_line(tmp_path):
    import torch

    marker = tmp_path / "PICKLED"

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = tmp_path / "pickled"
    tiny_model("llama").config.save_pretrained(folder)
    torch.save({"model.embed_tokens.weight": RunsCode()}, folder / "pytorch_model.bin")
    result = run("info", folder)
    assert_one_line_error(result, "weights-only loader refused them")
    assert not marker.exists()


# ------------------------------------------------------------------ disks


def test_a_full_disk_is_refused_before_writing(tiny_dir, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 50_000, 50_000))
    for extra in ([], ["--no-load"]):
        result = run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out", *extra)
        assert_one_line_error(result, "not enough disk space")
        assert "MB, 0.05 MB free" in result.stderr
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("code, fragment", [
    (errno.EROFS, "read-only file system"),
    (errno.ENOSPC, "no space left on the disk"),
    (errno.EACCES, "permission denied"),
])
def test_write_errors_of_the_machine_are_one_line(tiny_dir, tmp_path, monkeypatch, code, fragment):
    from layerprune.models import checkpoint

    def refusing(folder, path, tensors, metadata):  # the disk refuses while the weights are written
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(checkpoint, "write_shard", refusing)
    result = run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out", "--no-load")
    assert_one_line_error(result, fragment)
    assert "model.safetensors" in result.stderr
    assert not (tmp_path / "out").exists()


def test_other_os_errors_stay_visible_as_bugs(tiny_dir, tmp_path, monkeypatch):
    from layerprune.models import checkpoint

    def broken(folder, path, tensors, metadata):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/somewhere/internal")

    monkeypatch.setattr(checkpoint, "write_shard", broken)
    result = run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out", "--no-load")
    assert isinstance(result.exception, FileNotFoundError)
    assert "error:" not in result.stderr


# ------------------------------------------------------------------ values checked before any model loads


@pytest.mark.parametrize("value", ["1.5", "0", "nan", "-0.25"])
def test_ratio_is_checked_before_the_model(tmp_path, value):
    result = run("prune", tmp_path / "no-such-model", "--ratio", value, "--out", tmp_path / "out")
    assert_one_line_error(result, "--ratio")
    assert "model not found" not in result.stderr


@pytest.mark.parametrize("drop, fragment", [([-1], "layer indices must be >= 0"), ("abc", "drop"),
                                            ([2, 2], "duplicate layer indices")])
def test_yaml_drop_is_checked_before_the_model(tmp_path, drop, fragment):
    config = {"model": str(tmp_path / "no-such-model"), "out": str(tmp_path / "run"), "prune": {"drop": drop}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run("run", path)
    assert_one_line_error(result, fragment)
    assert "model not found" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "0"])
def test_humaneval_timeout_must_be_a_positive_number(tmp_path, value):
    result = run("eval", tmp_path / "no-such-model", "--tasks", "humaneval", "--humaneval-timeout", value,
                 "--out", tmp_path / "out")
    assert_one_line_error(result, "--humaneval-timeout")
    assert "model not found" not in result.stderr


def test_a_task_answer_longer_than_the_context_is_one_error(tiny_dir, tmp_path):
    # the tiny model reads 128 positions; lm-eval's own check is a bare assert
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"question": "q?", "choices": ["a", "x" * 300], "answer": 0}) + "\n")
    result = run("eval", tiny_dir, "--tasks", path, "--ppl", "none", "--no-samples", "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "longer than the model's context of 128 tokens" in errors[0], result.stderr
    assert "Traceback" not in result.output and "AssertionError" not in result.output
