"""The teacher-target cache's key and its files: a key that changes whenever the teacher's weights do, and
a cached file that is checked before use (a corrupt, truncated, empty or inconsistent file is removed
with a warning and made again, never a traceback and never silently wrong targets).

The key hashes the teacher's weight files, every byte of them (sha256), when the teacher was loaded from a
local folder; each file's digest is kept in `file-digests.json` beside the cache, keyed by the file's
path, size and modification time, so an unchanged multi-GB teacher is not read again. A teacher that is
only in memory is hashed tensor by tensor. A cheap digest of the loaded tensors (sums and first values)
is part of the key either way, so a teacher changed in memory after loading misses the cache too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch


def load_cached(path: Path, rows: int, k: int, vocab: int, states: int = 0):
    """(values, indices, offsets[, states]) of a cache file that is whole and fits these rows (and holds the
    hidden states of `states` layers when asked), else None: a broken file
    (corrupt, truncated, empty, short offsets, indices outside the vocabulary, non-finite values) is removed
    with a warning, and the targets are computed again."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(path))
        problem = _inconsistency(tensors, rows, k, vocab, states)
    except Exception as err:  # safetensors raises its own error types for a damaged file
        problem = f"it cannot be read ({type(err).__name__}: {str(err)[:200]})"
    if problem is None:
        return (tensors["values"], tensors["indices"], tensors["offsets"],
                *((tensors["states"],) if states else ()))
    warnings.warn(f"teacher cache {path} is damaged ({problem}); removed it, computing the targets again",
                  stacklevel=3)
    path.unlink(missing_ok=True)
    return None


def _inconsistency(tensors: dict, rows: int, k: int, vocab: int, states: int = 0) -> str | None:
    expected = {"values", "indices", "offsets"} | ({"states"} if states else set())
    if set(tensors) != expected:
        return f"it holds {sorted(tensors)}, not {', '.join(sorted(expected))}"
    values, indices, offsets = tensors["values"], tensors["indices"], tensors["offsets"]
    if offsets.dim() != 1 or len(offsets) != rows + 1:
        return f"{len(offsets)} offsets for {rows} rows"
    if int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any()):
        return "offsets that do not rise from 0"
    n = int(offsets[-1])
    if values.dim() != 2 or tuple(values.shape) != (n, k) or tuple(indices.shape) != (n, k):
        return f"targets of shape {tuple(values.shape)} / {tuple(indices.shape)}, expected ({n}, {k})"
    if n and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        return f"token indices outside the vocabulary of {vocab}"
    if not bool(torch.isfinite(values).all()):
        return "values that are NaN or infinite"
    if states and (tensors["states"].dim() != 3 or tuple(tensors["states"].shape[:2]) != (n, states)):
        return f"hidden states of shape {tuple(tensors['states'].shape)}, expected ({n}, {states}, hidden)"
    return None
