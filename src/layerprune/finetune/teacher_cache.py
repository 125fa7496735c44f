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

import hashlib
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.files.outputs import read_json, write_json

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def loaded_digest(model: nn.Module) -> str:
    """A cheap digest of the loaded weights: config, every tensor's name, shape, sum and first values."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            flat = tensor.detach().reshape(-1)
            digest.update(f"{name}{tuple(tensor.shape)}{float(flat.double().sum()):.10e}".encode())
            digest.update(flat[:16].float().cpu().numpy().tobytes())
    return digest.hexdigest()


def tensors_digest(model: nn.Module) -> str:
    """sha256 of every byte of every tensor (a teacher with no files to hash)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            digest.update(f"{name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def weight_files(model: nn.Module) -> list[Path]:
    folder = Path(getattr(model, "name_or_path", "") or "")
    if not str(folder) or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file())


def file_digest(path: Path, known: dict) -> str:
    """sha256 of the file, from `known` (path -> size, mtime, digest) when size and mtime still match."""
    real = str(path.resolve())
    stat = os.stat(real)
    entry = known.get(real)
    if isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    known[real] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return digest.hexdigest()


def teacher_fingerprint(model: nn.Module, cache_dir: str | os.PathLike) -> str:
    """The teacher's content key: its weight files' digests (or its tensors'), its config and loaded dtype."""
    files = weight_files(model)
    digest = hashlib.sha256(loaded_digest(model).encode())
    if not files:
        digest.update(tensors_digest(model).encode())
        return digest.hexdigest()
    _hash_files(digest, files, cache_dir)
    return digest.hexdigest()


def _hash_files(digest, files: list[Path], cache_dir) -> None:
    """Add each file's sha256 (remembered in file-digests.json by path, size and mtime) to `digest`."""
    record = Path(cache_dir) / "file-digests.json"
    try:
        known = read_json(record, missing_ok=True) or {}
    except LayerpruneError:
        known = {}  # a damaged record only costs hashing again
    known = known if isinstance(known, dict) else {}
    for path in files:
        digest.update(f"{path.name}:{file_digest(path, known)}".encode())
    try:
        write_json(record, known)
    except OSError:
        pass  # the record is an optimisation: hashing again next time is correct too


def folder_fingerprint(folder: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """The content key of a teacher checkpoint that is run from disk (never loaded whole): its config and
    every weight file's digest."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    files = sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file())
    _hash_files(digest, files, cache_dir)
    return "streamed-" + digest.hexdigest()


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
