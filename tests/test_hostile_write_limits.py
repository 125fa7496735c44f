"""A file-size limit met while writing (EFBIG: `ulimit -f`, a file system's largest file) is one line naming
the output, and nothing is left half-written (docs/safety.md)."""

import os
import resource
import subprocess
import sys

import pytest

from layerprune import save_model
from gguf_files import write_gguf
from tiny_models import tiny_model, tiny_tokenizer


def under_a_file_size_limit(args, limit=20_000):
    def limited():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([sys.executable, "-m", "layerprune", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=limited, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)


@pytest.mark.parametrize("kind", ["folder", "gguf"])
def test_a_file_size_limit_is_one_line_naming_the_output_and_leaves_nothing(tmp_path, kind):
    if kind == "folder":
        source = tmp_path / "model"
        save_model(tiny_model("llama"), tiny_tokenizer(), source)
        out = tmp_path / "pruned"
    else:
        source = write_gguf(tmp_path / "model.gguf", "llama", n_blocks=4)
        out = tmp_path / "pruned.gguf"
    before = sorted(os.listdir(tmp_path))
    result = under_a_file_size_limit(["prune", source, "--drop", "1", "--out", out])
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: a file grew past the file-size limit while writing"), result.stderr
    assert str(out) in lines[-1] and "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == before  # no output, no temporary file or folder
