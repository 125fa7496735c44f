"""Renames that never replace a path they were not meant to: the kernel's no-replace and exchange renames
(renameat2 on Linux, renamex_np on macOS), with a checked fallback where neither is available."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from pathlib import Path

# errno values meaning "this kernel, libc or file system has no such rename": use the fallback.
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _kernel_rename():
    """A function (src, dst, how) -> errno (0: done) for how in {"noreplace", "exchange"}, or None."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        fn, flags = libc.renameat2, {"noreplace": 1, "exchange": 2}  # RENAME_NOREPLACE, RENAME_EXCHANGE
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        at_cwd = -100

        def call(src, dst, how):
            return 0 if fn(at_cwd, os.fsencode(src), at_cwd, os.fsencode(dst), flags[how]) == 0 else ctypes.get_errno()
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        fn, flags = libc.renamex_np, {"noreplace": 0x4, "exchange": 0x2}  # RENAME_EXCL, RENAME_SWAP
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]

        def call(src, dst, how):
            return 0 if fn(os.fsencode(src), os.fsencode(dst), flags[how]) == 0 else ctypes.get_errno()
    else:
        return None
    return call


_RENAME = _kernel_rename()


def _kernel(src: Path, dst: Path, how: str) -> bool:
    """True when the kernel did the rename; False when it cannot do this kind here; OSError otherwise."""
    if _RENAME is None:
        return False
    code = _RENAME(src, dst, how)
    if code == 0:
        return True
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def rename_noreplace(src: Path, dst: Path) -> None:
    """Move src to dst; FileExistsError when dst exists, whatever it is."""
    if _kernel(src, dst, "noreplace"):
        return
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, "already exists", str(dst))
    # Without the kernel's check an EMPTY folder created in this instant would be replaced: nothing is lost.
    os.rename(src, dst)


def exchange(a: Path, b: Path, aside: Path) -> None:
    """Swap what a and b hold. Atomic where the kernel can; otherwise three renames through `aside` (a free
    path next to b), undone if the second fails."""
    if _kernel(a, b, "exchange"):
        return
    rename_noreplace(b, aside)
    try:
        rename_noreplace(a, b)
    except BaseException:
        rename_noreplace(aside, b)
        raise
    rename_noreplace(aside, a)
