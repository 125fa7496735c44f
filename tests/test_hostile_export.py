"""`export` under hostile conditions, with a stand-in for llama.cpp's converter: SIGTERM leaves no temporary
file and no converter process, a dangling symlink is not replaced without --overwrite, and a full disk
reads as one (docs/safety.md)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from typer.testing import CliRunner

import layerprune.export.gguf as gguf_export
from layerprune import save_model
from layerprune.cli import app
from cli_asserts import assert_one_line_error
from tiny_models import tiny_model, tiny_tokenizer

runner = CliRunner()


def fake_converter(folder, body: str):
    """A convert_hf_to_gguf.py stand-in: `body` runs with `out` (the --outfile) and `pid_file` defined."""
    script = folder / "convert_hf_to_gguf.py"
    script.write_text(textwrap.dedent("""\
        import os, sys, time
        out = sys.argv[sys.argv.index("--outfile") + 1]
        pid_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "converter.pid")
        """) + textwrap.dedent(body))
    return script


@pytest.fixture
def model(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    save_model(tiny_model("llama"), tiny_tokenizer(), folder)
    monkeypatch.setattr(gguf_export, "_sentencepiece_path", lambda log: None)
    return folder


def test_export_out_onto_a_dangling_symlink_needs_overwrite(model, tmp_path, monkeypatch):
    script = fake_converter(tmp_path, 'open(out, "wb").write(b"GGUF")\n')
    monkeypatch.setattr(gguf_export, "ensure_converter", lambda log=None: script)
    link = tmp_path / "out.gguf"
    link.symlink_to(tmp_path / "elsewhere" / "target.gguf")
    result = runner.invoke(app, ["export", str(model), "--out", str(link)])
    assert_one_line_error(result, "already exists")
    assert link.is_symlink() and not (tmp_path / "elsewhere").exists()


def test_a_converter_that_runs_out_of_space_says_so(model, tmp_path, monkeypatch):
    script = fake_converter(tmp_path, '''
        sys.stderr.write("Traceback (most recent call last):\\nOSError: [Errno 28] No space left on device\\n")
        sys.stderr.write("Writing: 45%|####      | 1.2M/2.6M\\n")
        sys.exit(1)
        ''')
    monkeypatch.setattr(gguf_export, "ensure_converter", lambda log=None: script)
    result = runner.invoke(app, ["export", str(model), "--out", str(tmp_path / "out.gguf")])
    assert_one_line_error(result, "no space left on the disk")
    assert "Writing" not in result.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.gguf")] == []


def test_sigterm_during_export_removes_its_temp_files_and_its_converter(model, tmp_path):
    script = fake_converter(tmp_path, '''
        open(out, "wb").write(b"half a GGUF")
        open(pid_file, "w").write(str(os.getpid()))
        time.sleep(120)
        ''')
    code = textwrap.dedent(f"""
        import layerprune.export.gguf as g
        from pathlib import Path
        g.ensure_converter = lambda log=None: Path({str(script)!r})
        g._sentencepiece_path = lambda log: None
        g.export_gguf({str(model)!r}, {str(tmp_path / "out" / "m.gguf")!r}, "f16")
        """)
    process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    pid_file = tmp_path / "converter.pid"
    deadline = time.time() + 60
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    converter = int(pid_file.read_text())
    try:
        assert list((tmp_path / "out").iterdir()), "the converter is writing its temporary file"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == -signal.SIGTERM
        assert list((tmp_path / "out").iterdir()) == []
        assert not alive_after(converter, seconds=5), "the converter outlived the export"
    finally:
        if alive_after(converter, seconds=0):
            os.kill(converter, signal.SIGKILL)


def alive_after(pid: int, seconds: float) -> bool:
    deadline = time.time() + seconds
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        if time.time() >= deadline:
            return True
        time.sleep(0.1)
