"""Where layerprune keeps what it computes once: converted models, teacher targets, cached responses."""

from __future__ import annotations

import os
from pathlib import Path

from layerprune.errors import LayerpruneError


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
