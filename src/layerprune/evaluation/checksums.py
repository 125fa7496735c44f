"""Checksums that name the exact data an evaluation scored (recorded in eval.json)."""

from __future__ import annotations

import functools
import gzip
import hashlib


@functools.lru_cache(maxsize=64)
def sha256_uncompressed(path: str) -> str:
    """sha256 of a file's content, gunzipped first for .gz (the MANIFEST.md convention)."""
    digest = hashlib.sha256()
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
