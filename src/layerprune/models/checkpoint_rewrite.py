"""A copy of a checkpoint on disk with some tensors given new values, without loading the model.

Every other tensor is copied byte for byte, shard to shard (models/checkpoint.py's writer); the new values
go, in the dtype each tensor is stored in, into one more shard; the index maps every name to its file.
The config, tokenizer and generation files are copied as they are. Used by layer-by-layer healing, which
changes a few tensors of a model that does not fit in memory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from layerprune.errors import LayerpruneError
from layerprune.files.outputs import atomic_output_dir, read_json, write_json
from layerprune.models.checkpoint import (
    INDEX_NAME,
    OutputTensor,
    copy_side_files,
    plan_shards,
    read_checkpoint,
    shard_file_names,
    source_metadata,
    weight_files,
    write_shard,
)
from layerprune.models.dtypes import SAFETENSORS_FLOATS
from layerprune.models.saving import write_record_file


def rewrite_checkpoint(src: str | os.PathLike, out: str | os.PathLike, replaced: dict[str, torch.Tensor], *,
                       overwrite: bool = False, provenance: dict | None = None, record_extra: dict | None = None,
                       files: dict[str, dict] | None = None, inputs=()) -> Path:
    """Write `src` to `out` with the tensors named in `replaced` (checkpoint names) set to new values;
    provenance: the config's new `layerprune` entry (also written to layerprune.json, with record_extra);
    files: extra JSON files of the output ({"heal.json": record})."""
    from safetensors.torch import save_file

    src = Path(src)
    entries = read_checkpoint(src)
    by_name = {entry.name: entry for entry in entries}
    unknown = sorted(set(replaced) - set(by_name))
    if unknown:
        raise LayerpruneError(f"{src} has no tensor {unknown[0]} to rewrite")
    for name, value in replaced.items():
        if list(value.shape) != list(by_name[name].shape):
            raise LayerpruneError(f"the new {name} has shape {tuple(value.shape)}, the checkpoint's "
                                  f"{tuple(by_name[name].shape)}")
    copied = [OutputTensor(entry.name, entry) for entry in entries if entry.name not in replaced]
    limit = max((src / f).stat().st_size for f in weight_files(src))
    shards = plan_shards(copied, limit) if copied else []
    names = shard_file_names(len(shards) + 1)
    metadata = source_metadata(src, entries)
    new_values = {name: value.detach().to("cpu", SAFETENSORS_FLOATS.get(by_name[name].dtype, value.dtype))
                  .contiguous() for name, value in replaced.items()}
    copy_side_files(src, None)  # links outside the folder fail before anything is written
    with atomic_output_dir(out, overwrite, inputs=[src, *inputs]) as tmp:
        for file, shard in zip(names, shards):
            write_shard(src, tmp / file, shard, metadata)
        save_file(new_values, str(tmp / names[-1]), metadata=metadata)
        weight_map = {t.name: file for file, shard in zip(names, shards) for t in shard}
        weight_map.update({name: names[-1] for name in new_values})
        write_json(tmp / INDEX_NAME, {"metadata": {"total_size": sum(e.nbytes for e in entries)},
                                      "weight_map": dict(sorted(weight_map.items()))})
        shutil.copy2(src / "config.json", tmp / "config.json")
        if provenance is not None:
            config = read_json(src / "config.json")
            write_json(tmp / "config.json", {**config, "layerprune": provenance})
            write_record_file(tmp, provenance, record_extra)
        copy_side_files(src, tmp)
        for name, record in (files or {}).items():
            (tmp / name).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out)
