"""Fingerprints of loaded weights and of model folders: cache keys that change when the weights do."""

from __future__ import annotations

import hashlib
import os
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
    if (isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns
            and _is_sha256(entry.get("sha256"))):  # an entry damaged by hand or a crash costs a hash, not an error
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    known[real] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest.hexdigest()}
    return digest.hexdigest()


def _is_sha256(value) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def teacher_fingerprint(model: nn.Module, cache_dir: str | os.PathLike) -> str:
    """The teacher's content key: its weight files' digests (or its tensors'), its config and loaded dtype."""
    files = weight_files(model)
    digest = hashlib.sha256(loaded_digest(model).encode())
    if not files:
        digest.update(tensors_digest(model).encode())
        return digest.hexdigest()
    _hash_files(digest, files, cache_dir)
    return digest.hexdigest()


def file_digests(files: list[Path], cache_dir: str | os.PathLike) -> list[str]:
    """sha256 of each file, remembered in `cache_dir`/file-digests.json by path, size and mtime (an unchanged
    file is read once). The record is rewritten whole (temporary file + rename); two processes rewriting it
    at once may lose each other's new entries, which only costs hashing those files again."""
    record = Path(cache_dir) / "file-digests.json"
    try:
        known = read_json(record, missing_ok=True) or {}
    except LayerpruneError:
        known = {}  # a damaged record only costs hashing again
    known = known if isinstance(known, dict) else {}
    digests = [file_digest(path, known) for path in files]
    try:
        write_json(record, known)
    except OSError:
        pass  # the record is an optimisation: hashing again next time is correct too
    return digests


def _hash_files(digest, files: list[Path], cache_dir) -> None:
    """Add each file's sha256 (file_digests) to `digest`."""
    for path, sha256 in zip(files, file_digests(files, cache_dir)):
        digest.update(f"{path.name}:{sha256}".encode())


def folder_fingerprint(folder: str | os.PathLike, cache_dir: str | os.PathLike) -> str:
    """The content key of a teacher checkpoint that is run from disk (never loaded whole): its config and
    every weight file's digest."""
    folder = Path(folder)
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    files = sorted(p for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file())
    _hash_files(digest, files, cache_dir)
    return "streamed-" + digest.hexdigest()
