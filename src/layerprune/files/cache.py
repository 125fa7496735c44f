"""Where layerprune keeps what it computes once: converted models, teacher targets, cached responses; and how
an entry gets there, so that two processes (two runs, two users of one cache) can share the folder.

Every entry is named by what it was made from (a content digest, a pinned version), so two processes that
make the same entry make the same bytes. An entry appears whole or not at all: a file is written under a
temporary name of its own process (host, pid, random) and renamed over its name in one `os.replace`; a
folder is filled under such a name, carries a manifest of its files' sizes (written last), and is renamed
into place. A reader that finds an entry not whole (a file lost or cut short, a manifest that does not
match) makes it again rather than use it; one that finds another process's whole entry where it meant to put
its own keeps that one. An index file (`file-digests.json`) is rewritten whole the same way, so the worst a
race costs is an entry of it lost, which is computed again.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from pathlib import Path
from typing import Callable

from layerprune.errors import LayerpruneError
from layerprune.files.outputs import clean_stale_temps, remove_path, temp_path

MANIFEST = ".layerprune-cache.json"  # in a cached folder: {"files": {relative path: size}}, written last
_PLACE_TRIES = 5


def cache_dir() -> Path:
    """Root of layerprune's cache: $LAYERPRUNE_CACHE, else ~/.cache/layerprune. Refused in one line when it,
    or the nearest of its parents that exists, is not a folder: found before any work, not at the first write."""
    given = os.environ.get("LAYERPRUNE_CACHE")
    root = Path(given or Path.home() / ".cache" / "layerprune")
    existing = next((p for p in (root, *root.parents) if os.path.exists(p)), None)
    if existing is not None and not existing.is_dir():
        where = "LAYERPRUNE_CACHE" if given else "the cache folder"
        named = root if existing == root else f"{root} (inside the file {existing})"
        raise LayerpruneError(f"{where} {named} is not a folder; set LAYERPRUNE_CACHE to a folder")
    return root


def publish_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Make the cache file `path` with `write(tmp)` under a temporary name of this process beside it, then
    rename it over `path`: a reader sees no file or a whole one. The temporary file goes on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise
    return path


def publish_folder(target: str | os.PathLike, fill: Callable[[Path], None],
                   whole: Callable[[Path], bool] | None = None) -> Path:
    """The cached folder `target`, made with `fill(tmp)` in a temporary folder of this process beside it when
    it is not whole (folder_is_whole, or `whole` where given); then renamed into place. An entry that is not
    whole is moved aside and removed first; one that another process published meanwhile is kept and ours
    dropped. The temporary folder goes on any error."""
    target = Path(target)
    whole = whole or folder_is_whole
    if whole(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(target)
    tmp = temp_path(target)
    try:
        tmp.mkdir()
        fill(tmp)
        write_manifest(tmp)
        for _ in range(_PLACE_TRIES):
            if whole(target):  # another process was first: its entry is as good as ours
                return target
            _move_aside(target)
            with contextlib.suppress(FileExistsError, FileNotFoundError):
                try:
                    os.rename(tmp, target)
                    return target
                except OSError as err:
                    if err.errno != errno.ENOTEMPTY:  # another process's folder landed there first
                        raise
    finally:
        remove_path(tmp)
    raise LayerpruneError(f"could not put the cache entry {target} in place: other processes keep replacing it; "
                          "rerun, or set LAYERPRUNE_CACHE to a folder of this run's own")


def _move_aside(target: Path) -> None:
    """Remove an entry that is not whole: renamed to a temporary name of ours first (one rename: no other process
    can be handed half of it), then deleted."""
    if not (target.exists() or target.is_symlink()):
        return
    aside = temp_path(target)
    try:
        os.rename(target, aside)
    except FileNotFoundError:  # another process moved it first
        return
    remove_path(aside)


def write_manifest(folder: Path) -> None:
    """The sizes of every file in `folder` (links and the manifest itself aside), written last."""
    files = {str(p.relative_to(folder)): p.stat().st_size
             for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n", encoding="utf-8")


def folder_is_whole(folder: str | os.PathLike) -> bool:
    """A cached folder (not a link) whose manifest can be read and whose every listed file is there at its size."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        return isinstance(files, dict) and bool(files) and all(
            isinstance(size, int) and (folder / name).is_file() and (folder / name).stat().st_size == size
            for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False
