"""The shared small rules: reading JSON, naming dtypes, the pad id, fetching from PyPI."""

import subprocess
from types import SimpleNamespace

import pytest
import torch

from layerprune import LayerpruneError
from layerprune.models.dtypes import parse_dtype, stored_dtype
from layerprune.models.tokens import pad_token_id
from layerprune.files.outputs import read_json, write_json
from layerprune.files.pypi import last_line, pip_download


def test_read_json_reads_what_write_json_wrote(tmp_path):
    data = {"a": [1, 2.5, None], "b": "é"}
    assert read_json(write_json(tmp_path / "x.json", data)) == data


@pytest.mark.parametrize(
    "content, message",
    [(None, "does not exist"), (b"{not json", "is not valid JSON"), (b"\xff\xfe{}", "is not UTF-8")],
)
def test_read_json_names_the_file_it_cannot_read(tmp_path, content, message):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(LayerpruneError, match=message) as err:
        read_json(path)
    assert str(path) in str(err.value)


def test_read_json_missing_ok(tmp_path):
    assert read_json(tmp_path / "absent.json", missing_ok=True) is None
    (tmp_path / "bad.json").write_text("[")
    with pytest.raises(LayerpruneError, match="is not valid JSON"):
        read_json(tmp_path / "bad.json", missing_ok=True)


def test_read_json_refuses_a_folder(tmp_path):
    with pytest.raises(LayerpruneError, match=str(tmp_path)):
        read_json(tmp_path)


@pytest.mark.parametrize(
    "given, expected",
    [("auto", "auto"), ("bf16", torch.bfloat16), ("float16", torch.float16), ("torch.float32", torch.float32),
     (torch.float64, torch.float64)],
)
def test_parse_dtype(given, expected):
    assert parse_dtype(given) == expected


def test_parse_dtype_refuses_unknown_names():
    with pytest.raises(LayerpruneError, match="unknown dtype 'int4'"):
        parse_dtype("int4")


@pytest.mark.parametrize(
    "stored, expected",
    [(torch.bfloat16, torch.bfloat16), ("float16", torch.float16), ("torch.float32", torch.float32),
     (None, None), ("no-such-dtype", None)],
)
def test_stored_dtype(stored, expected):
    assert stored_dtype(SimpleNamespace(dtype=stored)) == expected


@pytest.mark.parametrize(
    "pad, eos, expected",
    [(3, 2, 3), (0, 2, 0), (None, 2, 2), (None, [7, 8], 7), (None, [], 0), (None, None, 0)],
)
def test_pad_token_id_prefers_pad_then_first_eos_then_zero(pad, eos, expected):
    assert pad_token_id(SimpleNamespace(pad_token_id=pad, eos_token_id=eos)) == expected


def test_pad_token_id_without_a_source():
    assert pad_token_id(None) == 0


def _fake_pip(monkeypatch, returncode: int, stderr: str = "") -> list[list[str]]:
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    monkeypatch.setattr(subprocess, "run", run)
    return calls


def test_pip_download_asks_for_wheels_or_the_named_sdists(monkeypatch, tmp_path):
    calls = _fake_pip(monkeypatch, 0)
    assert pip_download(["a-b==1.0"], tmp_path / "wheels", what="a") == tmp_path / "wheels"
    pip_download(["llama-cpp-python==0.3.36"], tmp_path / "sdists", what="b", sdist=True)
    assert (tmp_path / "wheels").is_dir()
    assert calls[0][-3:] == ["-d", str(tmp_path / "wheels"), "a-b==1.0"]
    assert "--no-deps" in calls[0] and "--only-binary=:all:" in calls[0]
    assert calls[1][calls[1].index("--no-binary") + 1] == "llama-cpp-python"


def test_pip_download_failure_is_one_line_naming_what(monkeypatch, tmp_path):
    _fake_pip(monkeypatch, 1, "Looking in indexes\nERROR: No matching distribution found for x==9\n\n")
    with pytest.raises(LayerpruneError, match=r"^could not download x \(a test\) from PyPI with pip: ERROR: No match"):
        pip_download(["x==9"], tmp_path, what="x (a test)")


def test_last_line():
    assert last_line("a\n  b  \n\n") == "b"
    assert last_line(None) == last_line("") == "(no output)"
