"""Reading the files a user hands layerprune: one place that decodes them, one kind of error.

Calibration and perplexity texts, task and instruction files, YAML settings: every reader of a user's
file goes through here, so a file that is missing, a folder, unreadable, a corrupt or truncated gzip
copy, not UTF-8, or a JSONL line that is not a JSON object gives one LayerpruneError that names the
file (and the line or byte offset), never a traceback. `.gz` files are read gunzipped.

Also here: what the CLI says about an operating-system error while writing (a full or read-only disk),
and the free-space check that runs before a large output is written.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import zlib
from pathlib import Path
from typing import IO, Iterator

from layerprune.errors import LayerpruneError

# What a truncated or corrupt gzip stream raises while it is read.
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def open_maybe_gz(path: str | os.PathLike, what: str = "file") -> IO[bytes]:
    """The file opened for reading bytes, gunzipped when its name ends in .gz.

    Opening errors are one LayerpruneError; errors of a corrupt gzip stream surface while reading, so read
    through `read_bytes`, `read_text` or `iter_jsonl`, which turn them into one too.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise LayerpruneError(f"{path} is a folder, not a {what}")
        return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")
    except FileNotFoundError:
        raise LayerpruneError(f"{what} not found: {path}") from None
    except PermissionError:
        raise LayerpruneError(f"cannot read {path}: permission denied") from None
    except OSError as err:
        raise LayerpruneError(f"cannot read {path}: {err.strerror or err}") from None


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The file's content (gunzipped for .gz)."""
    with _reading(path), open_maybe_gz(path, what) as f:
        return f.read()


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The file's content as UTF-8 text (gunzipped for .gz); a BOM is dropped, line ends are kept as stored."""
    return decode(read_bytes(path, what), path)


def decode(data: bytes, path: str | os.PathLike, offset: int = 0, line: int | None = None) -> str:
    """UTF-8 text of `data` (which starts at byte `offset` of `path`); the error names the byte's offset."""
    try:
        return data.decode("utf-8-sig" if offset == 0 else "utf-8")
    except UnicodeDecodeError as err:
        # utf-8-sig counts positions after a BOM it removed
        start = err.start + (3 if offset == 0 and data.startswith(b"\xef\xbb\xbf") else 0)
        where = f" (line {line})" if line is not None else ""
        raise LayerpruneError(
            f"{path} is not UTF-8 text: byte 0x{data[start]:02x} at offset {offset + start}{where} "
            "cannot be decoded; save the file as UTF-8"
        ) from None


def iter_lines(path: str | os.PathLike, what: str = "file") -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded one at a time (large files are not read whole)."""
    offset = 0
    with _reading(path), open_maybe_gz(path, what) as f:
        for number, raw in enumerate(f, 1):
            text = decode(raw, path, offset, number)
            offset += len(raw)
            yield number, text


def iter_jsonl(path: str | os.PathLike, what: str = "JSONL file") -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object is one error naming it."""
    for number, line in iter_lines(path, what):
        if not line.strip():
            continue
        yield number, parse_json_object(line, f"{path}:{number}")


def parse_json_object(text: str, where: str) -> dict:
    """One JSON object (a record); `where` names it in the error (file:line)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise LayerpruneError(f"{where} is not valid JSON ({err.msg})") from None
    except RecursionError:  # [[[[...]]]] thousands deep
        raise LayerpruneError(f"{where} is nested too deeply to be a record") from None
    if not isinstance(value, dict):
        raise LayerpruneError(f"{where} is not a JSON object (it is a JSON {_json_kind(value)}); "
                              "each line must be one {...} record")
    return value


def _json_kind(value) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


class _reading:
    """Turns what a corrupt gzip stream or a failing read raises into one LayerpruneError naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or isinstance(err, LayerpruneError):
            return False
        if isinstance(err, _GZIP_ERRORS):
            raise LayerpruneError(
                f"{self.path} is not a valid gzip file: it is corrupt or truncated ({_short(err)})"
            ) from None
        if isinstance(err, OSError) and err.errno in (errno.EIO, errno.EACCES, errno.EPERM, errno.EISDIR):
            raise LayerpruneError(f"cannot read {self.path}: {err.strerror or err}") from None
        return False


def _short(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


# ---------------------------------------------------------------------------------------------
# Writing: disk space and the operating system's refusals
# ---------------------------------------------------------------------------------------------

MB = 1_000_000


def existing_parent(path: str | os.PathLike) -> Path:
    """The nearest folder of `path` that exists (where its disk's free space can be asked)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or ".")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space of the disk that would hold `path`, or None when it can't be known."""
    try:
        return shutil.disk_usage(existing_parent(path)).free
    except OSError:
        return None


def check_free_space(out: str | os.PathLike, needed: int, what: str = "the output") -> None:
    """Refuse before writing when `needed` bytes (everything the output will hold, plus 1%) do not fit on the
    disk of `out`; the error names the output and the disk (its mount point)."""
    free = free_bytes(out)
    if free is not None and needed * 1.01 > free:
        raise LayerpruneError(
            f"not enough disk space for {what} at {out}: needs {_mb(needed)} MB, {_mb(free)} MB free on the disk "
            f"mounted at {mount_point(out)}"
        )


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the disk that would hold `path`."""
    folder = existing_parent(path).resolve()
    while not os.path.ismount(folder) and folder != folder.parent:
        folder = folder.parent
    return folder


def _mb(n: int) -> str:
    return f"{max(n, 0) / MB:,.0f}" if n >= MB else f"{max(n, 0) / MB:.2f}"


# Errors of the machine, not of layerprune: a full disk, a read-only file system, a refused permission.
OS_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


def os_error_message(err: OSError) -> str | None:
    """One line for an OSError the user must fix on their machine; None for any other (a bug to show)."""
    if err.errno not in OS_ERRNOS:
        return None
    name = err.filename
    where = f" {name}" if name is not None else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(name) if name is not None else None
        room = f" ({_mb(free)} MB free)" if free is not None else ""
        quota = "disk quota exceeded" if err.errno == errno.EDQUOT else "no space left on the disk"
        return f"{quota} while writing{where}{room}; free some space or write the output elsewhere"
    if err.errno == errno.EFBIG:
        return _too_large(name)
    if err.errno == errno.EROFS:
        return f"cannot write{where}: it is on a read-only file system; write the output elsewhere"
    return f"permission denied{':' + where if where else ''}; check the file's permissions or use another path"


# How a full disk shows when a library hides the OSError: torch.save's stream writer, safetensors' Rust error.
_DISK_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "file write failed")


# How a file-size limit (RLIMIT_FSIZE, `ulimit -f`, or the file system's largest file) shows in a library.
_TOO_LARGE_TEXTS = ("file too large", "os error 27")


def _too_large(where) -> str:
    named = f" {where}" if where is not None else ""
    return (f"a file grew past the file-size limit while writing{named} (`ulimit -f`, or the largest file its file "
            "system allows); raise the limit or write the output elsewhere")


def _short_write(err: BaseException, where, written: int | None) -> str | None:
    """numpy's tofile reports a write cut short ("N requested and M written") without an errno: a file-size
    limit when the file reached it, else a full disk."""
    if not (isinstance(err, OSError) and err.errno is None and "requested and" in str(err)):
        return None
    try:
        import resource  # optional: Unix only

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and written is not None and written + MB > limit:
            return _too_large(where)
    except (ImportError, ValueError, OSError):
        pass
    free = free_bytes(where)
    room = f" ({_mb(free)} MB free)" if free is not None else ""
    return f"the disk took only part of {where}{room}; free some space or write the output elsewhere"


def disk_full_message(err: BaseException, where: str | os.PathLike, written: int | None = None) -> str | None:
    """One line for an error that is a full disk or a file-size limit (an OSError ENOSPC/EDQUOT/EFBIG, a
    library's error that wraps one, a short write), naming `where` (and its free space); None for any other
    error. written: bytes of the file when the write failed, if known."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return os_error_message(err if err.filename is not None else OSError(err.errno, err.strerror, str(where)))
    short = _short_write(err, where, written)
    if short is not None:
        return short
    text = str(err).lower()
    if not isinstance(err, OSError) and any(marker in text for marker in _TOO_LARGE_TEXTS):
        return _too_large(where)
    if isinstance(err, OSError) or not any(marker in text for marker in _DISK_FULL_TEXTS):
        return None
    free = free_bytes(where)
    room = f" ({_mb(free)} MB free)" if free is not None else ""
    return f"no space left on the disk while writing {where}{room}; free some space or write the output elsewhere"
