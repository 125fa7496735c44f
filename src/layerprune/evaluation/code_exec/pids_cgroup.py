"""A pids cgroup per program, where this process may make one (usually only as root).

It is the process-count limit that binds root (RLIMIT_NPROC never binds kernel uid 0, even inside a user
namespace), and it lists every process a program started, however it hid: the fallback kills them all.
cgroup v1's `pids` hierarchy, or v2 where this cgroup already hands `pids` to its children.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

PREFIX = "layerprune-"
STALE_S = 60  # an empty one this old was left by an evaluator that died (a live one is empty for microseconds)


def _cgroup_mounts() -> dict[str, tuple[str, str]]:
    """'pids' (v1) and/or 'unified' (v2) -> (mount point, root of the hierarchy it shows)."""
    mounts = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            dash = fields.index("-")
            fstype, options = fields[dash + 1], fields[dash + 3].split(",")
            if fstype == "cgroup" and "pids" in options:
                mounts.setdefault("pids", (fields[4], fields[3]))
            elif fstype == "cgroup2":
                mounts.setdefault("unified", (fields[4], fields[3]))
    return mounts


def find_base() -> Path | None:
    """This process's cgroup folder in a pids hierarchy, if a child with its own pids.max can be made there."""
    try:
        mounts = _cgroup_mounts()
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        number, controllers, path = line.split(":", 2)
        kind = "pids" if "pids" in controllers.split(",") else "unified" if number == "0" else None
        if kind not in mounts:
            continue
        mount_point, root = mounts[kind]
        if not (path + "/").startswith(root.rstrip("/") + "/"):
            continue
        base = Path(mount_point, os.path.relpath(path, root))
        if kind == "unified":
            try:
                if "pids" not in (base / "cgroup.subtree_control").read_text().split():
                    continue
            except OSError:
                continue
        if os.access(base, os.W_OK):
            return base
    return None


class PidsCgroup:
    def __init__(self, base: Path, limit: int):
        _remove_stale(base)
        self.folder = base / f"{PREFIX}{uuid.uuid4().hex}"
        self.folder.mkdir()
        try:
            (self.folder / "pids.max").write_text(str(limit))
        except OSError:
            self.folder.rmdir()
            raise

    def add(self, pid: int) -> None:
        (self.folder / "cgroup.procs").write_text(str(pid))

    def pids(self) -> list[int]:
        try:
            return [int(pid) for pid in (self.folder / "cgroup.procs").read_text().split()]
        except OSError:
            return []

    def remove(self) -> None:
        """Kill whatever is still inside, then remove the folder (exiting processes leave it within moments)."""
        for _ in range(200):
            for pid in self.pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                self.folder.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.01)


def _remove_stale(base: Path) -> None:
    now = time.time()
    for folder in base.glob(f"{PREFIX}*"):
        try:
            if now - folder.stat().st_mtime > STALE_S:
                folder.rmdir()  # fails while anything is inside: then it is not stale
        except OSError:
            pass
