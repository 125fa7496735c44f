"""Outputs appear atomically and never silently replace what a user had; JSON files are read back in one way."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from layerprune.errors import LayerpruneError


def check_output_dir(out: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing non-empty folder (or a file) unless overwrite; call before heavy work."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LayerpruneError(f"output {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise LayerpruneError(f"output folder {out} already exists and is not empty; pass --overwrite to replace it")
    return out


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to `out`; on success it is renamed into place.

    On error the temporary folder is removed and `out` is untouched. With overwrite,
    the old folder is moved aside first and deleted only after the rename succeeded.
    """
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_json(path: str | os.PathLike, data) -> Path:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | os.PathLike, *, missing_ok: bool = False) -> Any:
    """Parse a JSON file. A missing file gives None with missing_ok; otherwise it raises, like an unreadable,
    non-UTF-8 or invalid file, one LayerpruneError that names the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise LayerpruneError(f"{path} does not exist") from None
    except UnicodeDecodeError:
        raise LayerpruneError(f"{path} is not UTF-8 text, so not a JSON file") from None
    except OSError as err:
        raise LayerpruneError(f"could not read {path}: {err.strerror or err}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise LayerpruneError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
