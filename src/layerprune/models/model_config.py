"""Reading a model folder's transformers config: one place, one error."""

from __future__ import annotations

import os

from layerprune.errors import LayerpruneError, first_line


def read_model_config(folder: str | os.PathLike):
    """The transformers config of a model folder; one LayerpruneError when it can't be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except (OSError, ValueError, KeyError) as err:
        raise LayerpruneError(f"could not read the model config of {folder}: {first_line(err)}") from err
