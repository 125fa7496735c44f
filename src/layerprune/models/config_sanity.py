"""Limits before work: a model config's sizes are checked before transformers builds anything.

A config.json that says 10^9 layers used to build layers for minutes (and memory without end) before any
check ran; zero heads, a float or string layer count, or a per-layer list of the wrong length ended in a
traceback deep inside a model class. Each is one LayerpruneError naming the key, in milliseconds.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from pathlib import Path

from layerprune.errors import LayerpruneError, shorten
from layerprune.files.outputs import read_json

# Counts that must be whole and positive, by every name the families use; with a bound no real model nears.
COUNTS = {
    "num_hidden_layers": 100_000, "n_layer": 100_000, "num_layers": 100_000,
    "num_attention_heads": 100_000, "n_head": 100_000, "num_key_value_heads": 100_000,
    "hidden_size": 1_000_000, "n_embd": 1_000_000, "intermediate_size": 10_000_000, "ffn_dim": 10_000_000,
    "vocab_size": 100_000_000, "head_dim": 100_000,
}
PER_LAYER_LISTS = ("layer_types",)
# The shape a config must state: without it transformers takes its class default (LlamaConfig's is a 7B
# model's 32 layers of 4096) and every plan and load is of a model the folder does not hold. save_pretrained
# always writes these (they are not PretrainedConfig defaults); a nested text_config may omit its defaults.
SHAPE_FIELDS = {"layer count": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
                "hidden size": ("hidden_size", "n_embd", "d_model", "dim")}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _layers(section: dict) -> int | None:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = section.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_config_sanity(folder: str | os.PathLike) -> None:
    """Refuse a config.json whose sizes are not whole positive numbers, whose per-layer lists do not match the
    layer count, or which describes far more parameters than its weight files could hold. It reads the JSON
    itself: some config classes build per-layer lists in their constructor, so even AutoConfig would hang."""
    path = Path(folder) / "config.json"
    config = read_json(path) if path.is_file() else None
    if not isinstance(config, dict):
        return  # no config (or not a mapping): transformers' own error says so
    for section in (config, config.get("text_config")):
        if not isinstance(section, dict):
            continue
        for name, limit in COUNTS.items():
            value = section.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise LayerpruneError(f"{folder}: config.json's {name} must be a whole number, not "
                                      f"{str(value)[:40]!r}")
            if value <= 0 or value > limit:
                raise LayerpruneError(f"{folder}: config.json's {name} is {value:,}, outside 1..{limit:,}")
        layers = _layers(section)
        for name in PER_LAYER_LISTS:
            value = section.get(name)
            if value is not None and layers is not None and (not isinstance(value, list) or len(value) != layers):
                length = len(value) if isinstance(value, list) else type(value).__name__
                raise LayerpruneError(f"{folder}: config.json's {name} has {length} entries for {layers} layers")
    if "text_config" not in config and "model_type" in config:
        for what, names in SHAPE_FIELDS.items():
            if not any(name in config for name in names):
                raise LayerpruneError(f"{folder}: config.json states no {what} ({' / '.join(names)}); transformers "
                                      "would take its class default, a model this folder does not hold")
    _check_size_against_files(config, folder)
    _check_layers_against_weights(config, folder)


def estimated_parameters(config: dict) -> int:
    """A rough parameter count from config.json alone (attention + MLP per layer, embeddings and head)."""
    section = config.get("text_config") if isinstance(config.get("text_config"), dict) else config

    def number(*names, default=0) -> int:
        for name in names:
            value = section.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return default

    hidden = number("hidden_size", "n_embd", "d_model")
    inner = number("intermediate_size", "ffn_dim", "n_inner", default=4 * hidden)
    vocab = number("vocab_size")
    layers = _layers(section) or 0
    experts = number("num_local_experts", "num_experts", default=1)
    return layers * (4 * hidden * hidden + 3 * hidden * inner * experts) + 2 * vocab * hidden


def _check_size_against_files(config, folder) -> None:
    """The weights must be able to hold what the config describes (4-bit storage at the least): a config that
    describes vastly more is a lie, and building it would allocate that much before loading failed."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    stored = sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES) and p.is_file())
    if stored == 0:
        return
    params = estimated_parameters(config)
    if params / 2 > 8 * stored + 2**30:
        raise LayerpruneError(
            f"{folder}: config.json describes about {_count(params)} parameters, but its weight files hold "
            f"{stored / 1e6:,.0f} MB; the config does not match the weights (check num_hidden_layers and the sizes)")


# How families number their blocks in tensor names: model.layers.3., transformer.h.3., gpt_neox.layers.3. ...
_LAYER_NAME = re.compile(r"\.(?:layers|h|blocks|block|decoder\.layers)\.(\d+)\.")
_MAX_HEADER = 100_000_000


def _check_layers_against_weights(config: dict, folder) -> None:
    """A config that asks for more layers than the safetensors files hold is refused from the file headers
    alone (milliseconds); transformers would first build every layer it asks for (minutes for 10^5)."""
    layers = _layers(config.get("text_config") if isinstance(config.get("text_config"), dict) else config)
    files = sorted(Path(folder).glob("*.safetensors"))
    if layers is None or not files:
        return
    found: set[int] = set()
    for path in files:
        names = _tensor_names(path)
        if names is None:
            return  # unreadable header: the loader's own error names the file
        found |= {int(m.group(1)) for name in names if (m := _LAYER_NAME.search(name))}
    if found and layers > max(found) + 1:
        missing = shorten(str(list(range(max(found) + 1, layers))), 80)
        raise LayerpruneError(f"{folder} lacks weights that its config.json calls for: it says {layers:,} layers, the "
                              f"weight files hold layers 0 to {max(found)} (no tensor for layers {missing})")


def _tensor_names(path: Path) -> list[str] | None:
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > _MAX_HEADER:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error, RecursionError):
        return None
    return list(header) if isinstance(header, dict) else None


def _count(n: int) -> str:
    exponent = min(int(math.log10(max(n, 1)) // 3), 4)
    return f"{n / 1000 ** exponent:,.1f}{['', 'K', 'M', 'B', 'T'][exponent]}"
