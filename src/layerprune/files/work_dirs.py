"""Work folders: the Trainer checkpoints of a heal, beside its output (`finetune`) or inside a run folder.

A work folder is claimed like an output: layerprune makes it and marks it with `.layerprune-work`, a JSON
record of the settings its checkpoints are made with. It is resumed only under the same settings, and
deleted only if it carries that record. A folder of that name that layerprune did not make (someone's
files, the input model, the teacher, a symlink) is refused before any work, never used or deleted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from layerprune.common.settings import changed_keys, settings_digest
from layerprune.errors import LayerpruneError
from layerprune.files.outputs import check_not_input, read_json, write_json

WORK_MARKER = ".layerprune-work"


def _record(folder: Path) -> dict | None:
    """The folder's work record, or None when it is not a work folder layerprune made."""
    marker = folder / WORK_MARKER
    if folder.is_symlink() or not folder.is_dir() or marker.is_symlink() or not marker.is_file():
        return None
    try:
        record = read_json(marker)
    except LayerpruneError:
        return None
    return record if isinstance(record, dict) and "digest" in record else None


def claim_work_dir(folder: str | os.PathLike, settings: dict, *, inputs: Iterable = (), resume: bool = False,
                   option: str = "--resume") -> bool:
    """Make (or take back) the work folder for checkpoints made with `settings`. Returns whether it holds
    checkpoints to resume from. Refuses a folder that is, holds or lies in an input, a symlink, a file, a
    non-empty folder without the record, and (resume) checkpoints made with other settings."""
    folder = Path(folder)
    check_not_input(folder, inputs)
    if folder.is_symlink():
        raise LayerpruneError(f"{folder} is a symbolic link; layerprune keeps its checkpoints only in a folder it "
                              "makes there (remove the link or choose another --out)")
    if os.path.lexists(folder) and not folder.is_dir():
        raise LayerpruneError(f"{folder} exists and is not a folder; layerprune keeps its checkpoints there "
                              "(move it or choose another --out)")
    digest = settings_digest(settings)
    record = _record(folder)
    if record is None and folder.is_dir() and any(folder.iterdir()):
        raise LayerpruneError(f"{folder} holds files that layerprune did not write (it has no {WORK_MARKER} file), "
                              "and layerprune keeps its checkpoints there; move it or choose another --out")
    if record is not None and resume:
        if record["digest"] == digest:
            return True
        changes = "; ".join(changed_keys(record.get("settings"), settings)) or "unrecorded settings"
        raise LayerpruneError(f"{option}: the checkpoints in {folder} were made with other settings ({changes}); "
                              f"rerun with those settings to resume, or without {option} to start over")
    if record is not None:
        remove_work_dir(folder)  # checkpoints of an earlier heal that is not resumed
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / WORK_MARKER, {"settings": settings, "digest": digest})
    except OSError as err:
        raise LayerpruneError(f"cannot make the checkpoint folder {folder}: {err.strerror or err}") from None
    return False


def remove_work_dir(folder: str | os.PathLike) -> bool:
    """Delete a work folder, only if layerprune made it (its record is there); returns whether it did."""
    folder = Path(folder)
    if _record(folder) is None:
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return True


@contextlib.contextmanager
def removed_unless_used(folder: str | os.PathLike) -> Iterator[None]:
    """A heal refused or failed before its first checkpoint (bad data, a bad budget) leaves no work folder:
    one that still holds only its record is removed; one with checkpoints stays for --resume."""
    try:
        yield
    except BaseException:
        folder = Path(folder)
        if _record(folder) is not None and all(p.name == WORK_MARKER for p in folder.iterdir()):
            remove_work_dir(folder)
        raise
