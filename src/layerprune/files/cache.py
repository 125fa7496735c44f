"""Where layerprune keeps what it computes once: converted models, teacher targets, cached responses."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Root of layerprune's cache: $LAYERPRUNE_CACHE, else ~/.cache/layerprune."""
    root = os.environ.get("LAYERPRUNE_CACHE") or Path.home() / ".cache" / "layerprune"
    return Path(root)
