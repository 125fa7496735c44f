"""Outputs appear atomically, never replace an input or a folder layerprune did not write, and leave no
temporary files behind; JSON files are read back in one way. docs/safety.md lists the guarantees."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from pathlib import Path
from typing import Any, Iterable, Iterator

from layerprune.errors import LayerpruneError
from layerprune.files.renames import exchange, rename_noreplace
from layerprune.files.user_files import disk_full_message

# Every folder layerprune writes carries this file; --overwrite replaces only such folders (or empty ones).
MARKER = ".layerprune-output"
LOCK_FILE = ".layerprune-lock"  # a run or study folder's lock (runs/lock.py)
_MARKER_TEXT = "This folder was written by layerprune; its --overwrite may replace it.\n"
_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
_TEMP_TAIL = re.compile(r"(?P<host>.+)-(?P<pid>\d+)-[0-9a-f]{8}")  # after ".NAME.layerprune-tmp-"


# ------------------------------------------------------------------ checks before any work
def input_paths(*refs) -> list[Path]:
    """The local files and folders among model references and data sources (comma lists are split;
    hub ids, aliases and bundled names are not paths here and drop out)."""
    found = []
    for ref in refs:
        if ref is None:
            continue
        if isinstance(ref, (list, tuple)):
            found += input_paths(*ref)
            continue
        for text in {str(ref), *str(ref).split(",")}:
            if text.strip() and os.path.lexists(text.strip()):
                found.append(Path(text.strip()))
    return found


def output_target(out: str | os.PathLike) -> Path:
    """The absolute path an output really goes to: a symlinked output is written through its link."""
    return Path(out).resolve()


def check_not_input(out: str | os.PathLike, inputs: Iterable = (), *, replaces: bool = True) -> None:
    """Refuse an output that is an input, holds one, or (replaces=True) would replace a path inside one."""
    target = output_target(out)
    for path in input_paths(*inputs):
        real = output_target(path)
        if target == real:
            raise LayerpruneError(f"output {out} is the input {path}; write the output somewhere else")
        if target in real.parents:
            raise LayerpruneError(f"output {out} holds the input {path}; write the output somewhere else")
        if replaces and real in target.parents and os.path.lexists(target):
            raise LayerpruneError(f"output {out} already exists inside the input {path}, and replacing it would change "
                                  "that input; write the output somewhere else")


def is_layerprune_output(folder: str | os.PathLike) -> bool:
    """The folder carries layerprune's marker (a symlink named like it could point at anyone's file)."""
    marker = Path(folder) / MARKER
    return marker.is_file() and not marker.is_symlink()


def check_output_dir(out: str | os.PathLike, overwrite: bool, inputs: Iterable = ()) -> Path:
    """Refuse, before any heavy work, an output folder that is or holds an input, one that cannot be replaced
    atomically (the current folder, a mount point), a file, and an existing non-empty folder unless
    overwrite, which replaces only a folder layerprune wrote."""
    out = Path(out)
    check_not_input(out, inputs)
    target = output_target(out)
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise LayerpruneError(f"output {out} is the current folder or holds it, which cannot be replaced as a whole; "
                              "name a new folder for the output")
    if target.is_dir() and os.path.ismount(target):
        raise LayerpruneError(f"output {out} is a mount point, which cannot be replaced; name a folder inside it")
    if target.exists() and not target.is_dir():
        raise LayerpruneError(f"output {out} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()):
        if not overwrite:
            raise LayerpruneError(f"output folder {out} already exists and is not empty; pass --overwrite to "
                                  "replace it")
        if not is_layerprune_output(target):
            raise LayerpruneError(f"output folder {out} was not written by layerprune (it has no {MARKER} file), so "
                                  "layerprune will not replace it; remove it yourself or choose another output")
    return out


# ------------------------------------------------------------------ atomic writes
def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def temp_path(target: Path) -> Path:
    """A free name beside `target` that says who made it (host, pid), so leftovers can be cleaned safely."""
    return target.with_name(f".{target.name}.layerprune-tmp-{_HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def remove_path(path: Path) -> None:
    """Remove a file, a link (not its target) or a folder of our own; nothing if it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_temps(target: Path) -> None:
    """Remove temporary copies of `target` left by processes of this host that no longer run (kill -9)."""
    prefix = f".{target.name}.layerprune-tmp-"
    with contextlib.suppress(OSError):
        for path in target.parent.iterdir():
            match = _TEMP_TAIL.fullmatch(path.name[len(prefix):]) if path.name.startswith(prefix) else None
            if match and match["host"] == _HOST and not pid_alive(int(match["pid"])):
                remove_path(path)


class _Signalled(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _signals_raise() -> Iterator[None]:
    """While a temporary output exists, SIGTERM and SIGINT raise, so the cleanup below runs before the
    signal takes its usual course."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Signalled(signum)

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(sig) not in (signal.SIG_IGN, None):
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def _signals_blocked() -> Iterator[None]:
    """Hold SIGTERM and SIGINT back (they arrive right after) where an interruption would do harm."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    signals = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise inside the body, so its `finally` blocks (temporary files) and subprocess.run
    (which kills its child on any exception) clean up; then the signal takes its usual course."""
    try:
        with _signals_raise():
            yield
    except _Signalled as caught:
        signal.raise_signal(caught.signum)  # now with the previous handler: terminate, or KeyboardInterrupt
        raise SystemExit(128 + caught.signum) from None  # a handler that returned


def _replaceable(path: Path, overwrite: bool) -> bool:
    """What may be deleted to make room: an empty folder, or with overwrite a folder layerprune wrote."""
    if path.is_symlink() or not path.is_dir():
        return False
    return not any(path.iterdir()) or (overwrite and is_layerprune_output(path))


def _install(tmp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished `tmp` to `target`. What was at `target` is deleted only after the swap, and only if
    it is still what the checks allowed; anything else goes back where it was."""
    if not os.path.lexists(target):
        try:
            rename_noreplace(tmp, target)
            return
        except FileExistsError:
            pass  # it appeared meanwhile: the swap below checks what it is
    exchange(tmp, target, aside=temp_path(target))
    if _replaceable(tmp, overwrite):  # tmp now holds the old output
        remove_path(tmp)
        return
    exchange(tmp, target, aside=temp_path(target))
    raise LayerpruneError(f"{target} changed while the output was being written, so it was left as it is and "
                          "nothing was written")


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it is marked as layerprune's and moved into place.

    On any error, SIGTERM or SIGINT the temporary folder is removed and `out` is untouched; a symlinked
    `out` is written through (its target folder is replaced, the link stays). See check_output_dir for
    what is refused.
    """
    check_output_dir(out, overwrite, inputs)
    target = output_target(out)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(target)
        tmp = temp_path(target)
        tmp.mkdir()  # mode 0777 less the umask, like any folder the user makes
    except OSError as err:
        raise LayerpruneError(f"cannot write the output {out}: {err.strerror or err}") from None
    try:
        with _signals_raise():
            yield tmp
            with _signals_blocked():  # a signal mid-swap would delete whichever folder tmp then holds
                try:
                    (tmp / MARKER).write_text(_MARKER_TEXT)
                    _install(tmp, target, overwrite)
                except OSError as err:
                    raise LayerpruneError(f"cannot write the output {out}: {err.strerror or err}") from None
    except _Signalled as caught:
        remove_path(tmp)
        signal.raise_signal(caught.signum)  # now with the previous handler: terminate, or KeyboardInterrupt
        raise SystemExit(128 + caught.signum) from None  # a handler that returned
    except BaseException as err:
        remove_path(tmp)
        message = disk_full_message(err, out) if isinstance(err, Exception) else None
        if message is not None:  # a library's wrapped ENOSPC too: one line with the free space
            raise LayerpruneError(message) from None
        raise


def check_output_file(out: str | os.PathLike, overwrite: bool, inputs: Iterable = ()) -> Path:
    """Refuse, before any heavy work, an output file that is an input, a folder, or exists (a dangling link
    too) without overwrite; returns its absolute path."""
    check_not_input(out, inputs)
    target = Path(out).absolute()
    if target.is_dir():
        raise LayerpruneError(f"output {out} is a folder; pass a file path")
    if os.path.lexists(target) and not overwrite:
        raise LayerpruneError(f"output {out} already exists; pass --overwrite to replace it")
    return target


@contextlib.contextmanager
def atomic_output_file(out: str | os.PathLike, overwrite: bool = False, inputs: Iterable = ()) -> Iterator[Path]:
    """Yield a temporary file path beside the output file `out`; on success it replaces `out` in one rename.

    Refused: an input, a folder, and an existing path (a dangling link too) unless overwrite; a link at
    `out` is replaced by the file, never written through. On any error, SIGTERM or SIGINT the temporary
    file is removed and `out` is untouched."""
    target = check_output_file(out, overwrite, inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(target)
        tmp = temp_path(target)
        tmp.touch(exist_ok=False)  # mode 0666 less the umask, like any file the user makes
    except OSError as err:
        raise LayerpruneError(f"cannot write the output {out}: {err.strerror or err}") from None
    try:
        with _signals_raise():
            yield tmp
            with _signals_blocked():
                try:
                    os.replace(tmp, target)
                except OSError as err:
                    raise LayerpruneError(f"cannot write the output {out}: {err.strerror or err}") from None
    except _Signalled as caught:
        remove_path(tmp)
        signal.raise_signal(caught.signum)
        raise SystemExit(128 + caught.signum) from None
    except BaseException as err:
        written = tmp.stat().st_size if tmp.is_file() else None
        remove_path(tmp)
        message = disk_full_message(err, out, written) if isinstance(err, Exception) else None
        if message is not None:  # a full disk or a file-size limit: one line naming the output
            raise LayerpruneError(message) from None
        raise


def mark_output_dir(folder: str | os.PathLike) -> None:
    """Mark a folder that layerprune fills in place (a run folder) as its own."""
    write_text(Path(folder) / MARKER, _MARKER_TEXT)


def claim_folder(folder: str | os.PathLike, inputs: Iterable = (), what: str = "run folder") -> Path:
    """Take a folder that layerprune fills in place (a run or study folder): refuse one that is or holds an
    input, or that holds files layerprune did not write (no marker); create it and mark it."""
    folder = Path(folder)
    check_not_input(folder, inputs, replaces=False)
    if os.path.lexists(folder) and not folder.is_dir():
        raise LayerpruneError(f"{what} {folder} exists and is not a folder")
    # a lock file alone is an earlier claim's start: another run that holds it is refused by the lock
    foreign = [p for p in folder.iterdir() if not _is_lock(p)] if folder.is_dir() else []
    if foreign and not is_layerprune_output(folder):
        raise LayerpruneError(f"{what} {folder} holds files that layerprune did not write (it has no {MARKER} "
                              "file); choose another out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise LayerpruneError(f"cannot make the {what} {folder}: {err.strerror or err}") from None
    mark_output_dir(folder)
    return folder


def _is_lock(path: Path) -> bool:
    return path.name == LOCK_FILE and path.is_file() and not path.is_symlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a file atomically (temp file + rename). A symlink at `path` is replaced by the file, never
    written through: in a folder layerprune fills in place, a link may point at anyone's file."""
    path = Path(path)
    clean_stale_temps(path)
    tmp = temp_path(path)
    try:
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """write_bytes of UTF-8 text."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, data) -> Path:
    """Write JSON atomically (temp file + rename), with the permissions of a normal file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, json.dumps(data, indent=2, default=str) + "\n")


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
    except RecursionError:
        raise LayerpruneError(f"{path} is nested too deeply to be read") from None


def is_main_process() -> bool:
    """Under accelerate/torchrun only rank 0 writes outputs; a single process is rank 0."""
    return int(os.environ.get("RANK", "0")) == 0
