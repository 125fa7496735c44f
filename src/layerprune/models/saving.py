"""Save a (pruned) model as a stock Hugging Face checkpoint plus a layerprune.json record."""

from __future__ import annotations

import fnmatch
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from layerprune.files.outputs import atomic_output_dir, read_json, write_json
from layerprune.files.user_files import check_free_space
from layerprune.models.anatomy import count_parameters, parameter_bytes
from layerprune.models.model_card import model_card
from layerprune.models.sublayer import has_removed_sublayers, write_sublayer_model
from layerprune.models.surgery import provenance

RECORD_FILE = "layerprune.json"
# config.json, generation_config.json, layerprune.json, the model card, tokenizer_config.json, a chat template and
# the safetensors headers: a few KB to tens of KB each (a 70B checkpoint's headers ~100 KB); 1 MB covers them.
SIDE_FILES_BYTES = 1_000_000
SLOW_TOKENIZER_FILES = ("tokenizer*", "vocab.json", "vocab.txt", "merges.txt", "*.model", "*.tiktoken",
                        "special_tokens_map.json", "added_tokens.json")
_RECORDED_PACKAGES = ("layerprune", "torch", "transformers", "accelerate", "safetensors", "peft")


def package_versions() -> dict[str, str]:
    found = {}
    for name in _RECORDED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found


def write_model_files(model, tokenizer, folder: str | os.PathLike, extra: dict | None = None) -> None:
    """safetensors + config + generation config + tokenizer + layerprune.json + a model card (README.md)
    into an existing folder."""
    record = provenance(model)
    if has_removed_sublayers(model.config):
        write_sublayer_model(model, folder)  # layers without attention/MLP: a layerprune-only folder
    else:
        model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    written = read_json(write_record_file(folder, record, extra))
    card = model_card(written, parameters=count_parameters(model)["total"])
    (Path(folder) / "README.md").write_text(card, encoding="utf-8")  # what was removed and how, how to load


def write_record_file(folder: str | os.PathLike, record: dict, extra: dict | None = None) -> Path:
    """layerprune.json: the provenance record (a config's `layerprune` dict), `extra`, and package versions.

    Both ways of pruning write it (in memory here, on disk in checkpoint.py), so their folders match.
    """
    return write_json(
        Path(folder) / RECORD_FILE,
        {
            "source": record.get("source"),
            "original_num_layers": record["original_num_layers"],
            "kept_layers": record["kept_layers"],
            "dropped_layers": record["dropped_layers"],
            **({"removed_sublayers": record["removed_sublayers"]} if record.get("removed_sublayers") else {}),
            **({"experts": record["experts"]} if record.get("experts") else {}),  # experts kept / dropped per layer
            "history": record.get("history", []),
            "trust_remote_code": bool(record.get("trust_remote_code", False)),  # may its own code have run
            **(extra or {}),
            "versions": package_versions(),
        },
    )


def model_folder_bytes(model, tokenizer) -> int:
    """What write_model_files puts on disk: the weights, the tokenizer (its tokenizer.json is 3.5 MB for SmolLM2,
    33 MB for Gemma 3) and the small files."""
    return parameter_bytes(model) + tokenizer_bytes(tokenizer) + SIDE_FILES_BYTES


def tokenizer_bytes(tokenizer) -> int:
    """The size of the tokenizer's files as save_pretrained writes them: a fast tokenizer's tokenizer.json exactly
    (its pretty-printed JSON), else the tokenizer files of the folder it was loaded from."""
    if tokenizer is None:
        return 0
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return len(backend.to_str(pretty=True).encode("utf-8"))
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    if not str(folder) or not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.is_file() and any(fnmatch.fnmatch(p.name, pattern) for pattern in SLOW_TOKENIZER_FILES))


def save_model(model, tokenizer, out: str | os.PathLike, *, overwrite: bool = False, extra: dict | None = None) -> Path:
    """Write the model folder atomically; it reloads with `AutoModelForCausalLM.from_pretrained(out)`
    (a model with attention-only/MLP-only removals reloads with `layerprune.load_model(out)` only)."""
    check_free_space(out, model_folder_bytes(model, tokenizer), "the model")  # a full disk: one error before writing
    with atomic_output_dir(out, overwrite) as tmp:
        write_model_files(model, tokenizer, tmp, extra)
    return Path(out)
