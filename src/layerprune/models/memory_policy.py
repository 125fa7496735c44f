"""Whether `layerprune prune` loads the model or prunes its checkpoint on disk.

On disk when asked (--no-load), or when a local checkpoint's weights would not fit in the memory
available and the layers to drop are given by index.
"""

from __future__ import annotations

import os
from pathlib import Path

from layerprune.errors import LayerpruneError
from layerprune.files.outputs import read_json
from layerprune.hardware.devices import available_memory_bytes
from layerprune.models.anatomy import family_spec
from layerprune.models.checkpoint import weight_files
from layerprune.models.loading import model_folder, resolve_model_ref

# Weights bigger than this share of available memory switch `layerprune prune` to disk.
MEMORY_FRACTION = 0.8


def checkpoint_bytes(folder: str | os.PathLike) -> int:
    """Size of a folder's safetensors weights (0 when it has none)."""
    folder = Path(folder)
    try:
        return sum((folder / name).stat().st_size for name in weight_files(folder))
    except LayerpruneError:
        return 0


def too_big_to_load(folder: str | os.PathLike, fraction: float = MEMORY_FRACTION) -> tuple[int, int] | None:
    """(weights bytes, available bytes) when a checkpoint's weights exceed `fraction` of available memory."""
    available = available_memory_bytes()
    size = checkpoint_bytes(folder)
    if available is None or size <= fraction * available:
        return None
    return size, available


def on_disk_folder(
    ref: str | os.PathLike, *, no_load: bool, drop_given: bool, model_options: dict[str, bool], say=print
) -> Path | None:
    """Where `layerprune prune` prunes on disk: the model's folder, or None to load the model.

    no_load: only explicit --drop indices are possible (choosing layers with a metric needs the
    loaded model), and none of `model_options` ({flag: given}) that need it. Without no_load, a
    local folder whose weights exceed MEMORY_FRACTION of available memory is pruned on disk when
    it can be, and `say` tells the user either way.
    """
    needs_model = [flag for flag, given in model_options.items() if given]
    resolved = resolve_model_ref(ref)
    if no_load:
        if not drop_given:
            raise LayerpruneError(
                "--no-load prunes the layers given by --drop (and experts, by --drop-experts or an expert budget) "
                "only: --num-layers/--ratio choose layers with a metric, "
                "and data-driven metrics need the loaded model (score a big model with `layerprune score --streaming`, "
                "then pass the chosen indices to --drop)"
            )
        if needs_model:
            raise LayerpruneError(
                f"--no-load copies the stored tensors as they are; {', '.join(needs_model)} need the loaded model"
            )
        if resolved.kind == "hub":
            raise LayerpruneError(f"--no-load prunes a local checkpoint; {ref} is a hub id (download it first)")
        return Path(model_folder(ref))
    if resolved.kind != "folder" or (big := too_big_to_load(resolved.location)) is None:
        return None
    sizes = (
        f"the weights ({big[0] / 1e9:.1f} GB) exceed {MEMORY_FRACTION:.0%} of available memory ({big[1] / 1e9:.1f} GB)"
    )
    if drop_given and not needs_model and _has_family_spec(Path(resolved.location)):
        say(f"{sizes}: pruning the checkpoint on disk without loading it (as --no-load)")
        return Path(resolved.location)
    say(f"note: {sizes}; loading may fail. Without loading: `layerprune score --streaming`, then prune with --drop")
    return None


def _has_family_spec(folder: Path) -> bool:
    try:
        model_type = read_json(folder / "config.json").get("model_type")
    except (LayerpruneError, AttributeError):
        return False
    return family_spec(model_type) is not None
