"""Export a (pruned) model to GGUF for llama.cpp, with llama.cpp's own converter.

Why llama.cpp's converter (`convert_hf_to_gguf.py`) and not a PyPI converter package:
GGUF is defined by llama.cpp, and its converter is the reference implementation that
tracks every architecture, tokenizer pre-tokenizer hash and metadata key llama.cpp
reads (including the Q/K row permutation of Llama attention). On PyPI, `gguf` (llama.cpp's
own gguf-py) only reads and writes the container, with no HF->GGUF model logic; the
standalone converters (`convert-hf-to-gguf` 0.1.1, `gguf-converter` 0.3.1, `fanfu`,
`autogguf`) are small packages with few releases that wrap or re-implement some past
snapshot of this script, so their output may lag what current llama.cpp expects.
We therefore take the converter from one pinned sdist of `llama-cpp-python` on PyPI
(it vendors the whole llama.cpp tree): fetched once with `pip download` into the cache,
keeping only the converter files (convert_hf_to_gguf.py, conversion/, gguf-py/). The
`gguf-py` from the same tree goes on PYTHONPATH, so the converter runs with the library it was written for.

The converter runs in a subprocess; the output appears atomically (temp file + rename).
q4_k_m quantizes the f16 output with llama.cpp's quantizer: the library call from llama-cpp-python
(`layerprune[llamacpp]`), or a compiled `llama-quantize` on PATH / $LLAMA_QUANTIZE.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from layerprune.errors import LayerpruneError
from layerprune.export.llamacpp import INSTALL_HINT, have_llama_cpp, quantize_gguf
from layerprune.files.cache import MANIFEST, cache_dir, folder_is_whole, publish_folder
from layerprune.files.outputs import check_not_input, cleanup_on_signals, read_json
from layerprune.files.pypi import last_line, pip_download
from layerprune.files.user_files import disk_full_message
from layerprune.models.gguf_file import reader
from layerprune.models.loading import model_folder, resolve_model_ref

# llama-cpp-python 0.3.36 is the newest release on PyPI when this was written; its vendored
# llama.cpp converter writes llama.block_count etc. in the format current llama.cpp and
# transformers' GGUF reader understand (checked: SmolLM2 round trip, same greedy argmax).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_SDIST_PREFIX = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
_KEEP = ("convert_hf_to_gguf.py", "LICENSE", "conversion/", "gguf-py/gguf/", "gguf-py/LICENSE")

# --outtype values of convert_hf_to_gguf.py; the others go through llama.cpp's quantizer (from f16).
CONVERTER_QUANTS = ("f16", "bf16", "f32", "q8_0")
QUANTIZER_QUANTS = ("q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k", "q3_k_m", "q2_k", "q4_0", "q4_1", "q5_0", "q5_1")
QUANTS = (*CONVERTER_QUANTS, *QUANTIZER_QUANTS)
SAME_AS = "same-as:"  # --quant same-as:MODEL.gguf: the quantization of a GGUF file

# Config records of sub-layer removal (attention-only / MLP-only): llama.cpp has no way to express it.
_SUBLAYER_KEYS = ("removed_sublayers", "removed_attention", "removed_mlp", "sublayers")


def converter_dir() -> Path:
    """Where the llama.cpp converter of the pinned llama-cpp-python sdist lives in the cache."""
    return cache_dir() / "llama-cpp" / LLAMA_CPP_PYTHON_VERSION


def ensure_converter(log: Callable[[str], None] | None = None) -> Path:
    """Path of convert_hf_to_gguf.py, fetching the pinned sdist from PyPI on first use (a whole cache entry:
    files/cache.py)."""
    root = converter_dir()
    if _converter_whole(root):
        return root / "convert_hf_to_gguf.py"
    say = log or (lambda line: print(line, file=sys.stderr))
    root.parent.mkdir(parents=True, exist_ok=True)
    requirement = f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"
    say(f"layerprune: fetching llama.cpp's GGUF converter from PyPI ({requirement} sdist, once) into {root}")
    with tempfile.TemporaryDirectory(dir=root.parent) as tmp:
        what = f"{requirement} (llama.cpp's GGUF converter)"
        download = pip_download([requirement], Path(tmp) / "download", what=what, sdist=True)
        sdists = sorted(download.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise LayerpruneError(f"pip downloaded no sdist of {requirement} into {download}")
        publish_folder(root, lambda staged: _extract_converter(sdists[0], staged), whole=_converter_whole)
    return root / "convert_hf_to_gguf.py"


def _converter_whole(root: Path) -> bool:
    """The converter's folder is whole (its manifest), or was made before manifests by one rename and holds
    its script and the gguf package."""
    if folder_is_whole(root):
        return True
    return not (root / MANIFEST).exists() and (root / "convert_hf_to_gguf.py").is_file() and (
        root / "gguf-py" / "gguf" / "__init__.py").is_file()


def _extract_converter(sdist: Path, staged: Path) -> None:
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            if not member.name.startswith(_SDIST_PREFIX):
                continue
            rel = member.name[len(_SDIST_PREFIX):]
            if (member.isfile() or member.isdir()) and any(rel == k or rel.startswith(k) for k in _KEEP):
                member.name = rel
                members.append(member)
        archive.extractall(staged, members, filter="data")
    if not (staged / "convert_hf_to_gguf.py").is_file():
        raise LayerpruneError(f"{sdist.name} does not hold llama.cpp's convert_hf_to_gguf.py")


def _sentencepiece_path(log: Callable[[str], None] | None) -> Path | None:
    """The converter imports sentencepiece for every Llama model; fetch its wheel into the cache if missing."""
    if importlib.util.find_spec("sentencepiece") is not None:
        return None
    site = converter_dir() / f"site-py{sys.version_info.major}{sys.version_info.minor}"

    def whole(folder: Path) -> bool:  # or made before manifests, by one rename
        return folder_is_whole(folder) or (not (folder / MANIFEST).exists() and (folder / "sentencepiece").is_dir())

    if whole(site):
        return site
    say = log or (lambda line: print(line, file=sys.stderr))
    say(f"layerprune: fetching sentencepiece (needed by llama.cpp's converter) from PyPI into {site}")
    site.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=site.parent.parent) as tmp:
        pip_download(["sentencepiece>=0.2.0"], tmp, what="sentencepiece (needed by llama.cpp's converter)")
        wheels = sorted(Path(tmp).glob("sentencepiece-*.whl"))
        if not wheels:
            raise LayerpruneError(f"pip downloaded no sentencepiece wheel into {tmp}")

        def unpack(staged: Path) -> None:
            with zipfile.ZipFile(wheels[-1]) as archive:
                archive.extractall(staged)

        publish_folder(site, unpack, whole=whole)
    return site


def find_llama_quantize() -> str | None:
    """llama.cpp's compiled quantizer: $LLAMA_QUANTIZE, else `llama-quantize` on PATH."""
    given = os.environ.get("LLAMA_QUANTIZE")
    if given:
        return given if Path(given).is_file() else None
    return shutil.which("llama-quantize")


def check_exportable(folder: str | os.PathLike) -> dict:
    """Refuse, with one line, a model folder that GGUF cannot represent; returns its config."""
    config = read_json(Path(folder) / "config.json")
    record = config.get("layerprune")
    if isinstance(record, dict):
        found = [key for key in _SUBLAYER_KEYS if record.get(key)]
        if found:
            raise LayerpruneError(
                f"{folder} has attention-only/MLP-only removals ({found[0]}); GGUF and llama.cpp need whole "
                "decoder layers, so this model cannot be exported"
            )
    return config


def export_gguf(
    model: str | os.PathLike,
    out_file: str | os.PathLike,
    quant: str = "f16",
    *,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Write `model` (any layerprune model reference) as a GGUF file for llama.cpp.

    quant: f16 (default), bf16, f32, q8_0 (all written by llama.cpp's converter) or
    q4_k_m (llama.cpp's quantizer: llama-cpp-python's, or a `llama-quantize` binary). The GGUF carries the tokenizer and chat
    template from the model folder. Refuses an existing `out_file` unless overwrite.
    """
    keep_types, reference = {}, None
    if quant.lower().startswith(SAME_AS):
        reference = quant[len(SAME_AS):]
        quant, keep_types = same_quantization_as(reference)
        if log is not None:
            log(f"quantizing as {quant} (the reference's file type"
                f"{', and its embedding/output tensor types' if keep_types else ''})")
    quant = quant.lower()
    if quant not in QUANTS:
        raise LayerpruneError(f"unknown GGUF quantization {quant!r}; choose one of {', '.join(QUANTS)}, or "
                              f"{SAME_AS}MODEL.gguf")
    out = Path(out_file)
    if out.suffix != ".gguf":
        raise LayerpruneError(f"output {out} must be a .gguf file")
    if out.is_dir():
        raise LayerpruneError(f"output {out} is a folder; pass a .gguf file path")
    if os.path.lexists(out) and not overwrite:  # a dangling symlink too
        raise LayerpruneError(f"output {out} already exists; pass --overwrite to replace it")
    check_not_input(out, [model, reference])  # the same-as reference is an input too, through links as well
    quantize = None
    if quant in QUANTIZER_QUANTS:
        quantize = find_llama_quantize() or ("llama_cpp" if have_llama_cpp() else None)
        if quantize is None:
            raise LayerpruneError(
                f"{quant} needs llama.cpp's quantizer: {INSTALL_HINT}, or put llama.cpp's llama-quantize on PATH "
                f"(or set LLAMA_QUANTIZE), or export --quant f16 and run `llama-quantize model.gguf out.gguf "
                f"{quant.upper()}`"
            )
    if resolve_model_ref(model).kind == "hub":
        raise LayerpruneError(f"{model} is a hub id; export needs a local model folder, .gguf file or built-in alias")
    folder = model_folder(model)
    check_exportable(folder)

    script = ensure_converter(log)
    paths = [str(script.parent / "gguf-py")]
    sentencepiece = _sentencepiece_path(log)
    if sentencepiece is not None:
        paths.append(str(sentencepiece))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("HF_HUB_OFFLINE", "1")

    out.parent.mkdir(parents=True, exist_ok=True)
    with cleanup_on_signals():  # SIGTERM: the finally removes the temp files; subprocess.run kills its child
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        staged_f16 = tmp.with_name(tmp.name + ".f16") if quantize else None
        try:
            outtype = "f16" if quantize else quant
            cmd = [sys.executable, str(script), str(folder), "--outfile", str(staged_f16 or tmp),
                   "--outtype", outtype]
            result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=script.parent)
            if result.returncode != 0:
                raise LayerpruneError(f"llama.cpp's converter could not export {model}: "
                                      f"{_converter_error(result, out)}")
            if quantize == "llama_cpp":  # the library call behind llama-quantize, from llama-cpp-python

                fallbacks = quantize_gguf(staged_f16, tmp, quant.upper(), **keep_types)
                if fallbacks["fallback_tensors"] and log is not None:
                    kinds = ", ".join(f"{n} x {k}" for k, n in fallbacks["fallback_types"].items())
                    log(f"llama.cpp stored {fallbacks['fallback_tensors']} of {fallbacks['tensors']} tensors in "
                        f"other types ({kinds}): q4_K needs rows that are multiples of 256 values "
                        f"(rows here: {', '.join(map(str, fallbacks['row_lengths']))})")
            elif quantize:
                options = [f"--{key.replace('_', '-')}={_ggml_type_name(value)}" for key, value in keep_types.items()]
                result = subprocess.run([quantize, *options, str(staged_f16), str(tmp), quant.upper()],
                                        capture_output=True, text=True)
                if result.returncode != 0:
                    raise LayerpruneError(f"llama-quantize failed: {last_line(result.stderr or result.stdout)}")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the permissions of a normal one
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
            if staged_f16 is not None:
                staged_f16.unlink(missing_ok=True)
    return out


def same_quantization_as(reference: str | os.PathLike) -> tuple[str, dict]:
    """(--quant value, quantizer options) that write a model as the GGUF file `reference` is stored: its file
    type (general.file_type: q4_1, q4_k_m, ...) and, for the quantizer, the types of its token embedding and
    output tensors (SmolLM2's Q4_1 file keeps its embeddings in Q8_0)."""
    import gguf

    if not Path(reference).is_file():
        raise LayerpruneError(f"{SAME_AS}{reference}: no such GGUF file")
    r = reader(reference)
    field = r.fields.get("general.file_type")
    try:
        name = gguf.LlamaFileType(field.contents()).name if field is not None else None
    except ValueError:
        name = None
    quant = {"ALL_F32": "f32", "MOSTLY_F16": "f16", "MOSTLY_BF16": "bf16"}.get(name, (name or "").removeprefix("MOSTLY_"))
    if quant.lower() not in QUANTS:
        raise LayerpruneError(f"{reference} is stored as {name or 'an unrecorded file type'}, which layerprune cannot "
                              f"write; choose --quant from {', '.join(QUANTS)}")
    quant = quant.lower()
    if quant not in QUANTIZER_QUANTS:
        return quant, {}
    types = {t.name: int(t.tensor_type) for t in r.tensors if t.name in ("token_embd.weight", "output.weight")}
    keep = {"token_embedding_type": types.get("token_embd.weight")}
    if "output.weight" in types:
        keep["output_tensor_type"] = types["output.weight"]
    return quant, {key: value for key, value in keep.items() if value is not None}


def _ggml_type_name(value: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(value).name.lower()


def _converter_error(result: subprocess.CompletedProcess, out: Path | None = None) -> str:
    full = disk_full_message(RuntimeError(result.stderr or ""), out) if out is not None else None
    if full is not None:  # its last line is progress text; the cause is in the traceback above it
        return full
    line = last_line(result.stderr or result.stdout)
    if "pre-tokenizer was not recognized" in line:
        line += " (llama.cpp does not support this model's tokenizer)"
    return line
