"""One `layerprune run` per run (or study) folder at a time.

The lock is an flock on `.layerprune-lock` in the folder, which also holds the pid of the run that took
it (for the message). The kernel drops the lock when that process ends, however it ends (kill -9
included), so a lock file left behind by a dead run never blocks the next one, and a reused pid cannot
fake a live holder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path
from typing import Iterator

from layerprune.errors import LayerpruneError
from layerprune.files.outputs import LOCK_FILE  # noqa: F401  (public here too)


@contextlib.contextmanager
def run_folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold the folder's lock for the body; one LayerpruneError at once when another run holds it."""
    path = Path(folder) / LOCK_FILE
    try:  # never through a symlink: the lock file is truncated and written below
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise LayerpruneError(f"{path} is a symbolic link; layerprune writes its lock file only as a plain file "
                                  "(remove the link)") from None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise LayerpruneError(f"{folder} is in use by another layerprune run ({holder}); wait for it to finish "
                                  "or use another run folder") from None
        except OSError as err:
            raise LayerpruneError(f"cannot lock {path}: {err.strerror or err}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
