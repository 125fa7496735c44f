"""The teacher's next-token targets for distillation: top-k logits of every labelled position, computed
once and cached on disk, so more epochs, methods or reruns on the same data never run the teacher again.

The cache key hashes the teacher's weights (every byte: teacher_cache.py), the training rows and k; the
file holds the key's inputs next to the tensors, so a cached file says what it was made from. A damaged
cache file is removed and made again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from layerprune.data.collate import PadCollator
from layerprune.errors import LayerpruneError
from layerprune.files.cache import publish_file
from layerprune.files.user_files import disk_full_message
from layerprune.finetune.hidden_states import StateRecorder
from layerprune.finetune.teacher_cache import load_cached
from layerprune.hardware.compute import ComputeChoice
from layerprune.models.fingerprint import folder_fingerprint, teacher_fingerprint
from layerprune.models.layer_stream import streamed_forwards
from layerprune.models.logits import causal_lm_parts, head_logits, labelled_positions
from layerprune.models.model_config import read_model_config
from layerprune.models.tokens import IGNORE_INDEX


def rows_fingerprint(rows: list[dict]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["input_ids"], row["labels"]]).encode())
    return digest.hexdigest()


@dataclass
class TeacherTargets:
    """values/indices: (labelled positions of all rows, k) in row order; offsets[r]: row r's first position."""

    values: torch.Tensor
    indices: torch.Tensor
    offsets: torch.Tensor
    key: dict
    states: torch.Tensor | None = None  # (positions, cuts, hidden) bf16: the teacher's states after each cut

    def for_rows(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets of these rows' labelled positions, in the order a batch of them flattens."""
        picked = self._positions(rows)
        return self.values[picked], self.indices[picked]

    def states_for_rows(self, rows: list[int]) -> torch.Tensor:
        return self.states[self._positions(rows)]

    def _positions(self, rows: list[int]) -> torch.Tensor:
        return torch.cat([torch.arange(int(self.offsets[r]), int(self.offsets[r + 1])) for r in rows])


def compute_teacher_targets(teacher: nn.Module, rows: list[dict], k: int, *, pad_id: int, batch_size: int = 8,
                            compute: ComputeChoice | None = None, log=None, state_layers: list[int] = ()
                            ) -> tuple[torch.Tensor, ...]:
    """(values, indices, offsets) of the teacher's top-k logits at every labelled position of every row,
    and with state_layers (positions, len(state_layers), hidden) bf16 output states of those layers.
    compute: the autocast to run the teacher under (hardware.compute; bf16 is about 3x faster on a CPU with
    native bf16, 26x slower on one without); the targets are kept in fp32. None: as the weights are."""
    batches = _padded_batches(rows, pad_id, batch_size)
    teacher.eval()
    parts = []
    recorder = StateRecorder(teacher, list(state_layers)) if state_layers else None
    try:
        with torch.no_grad():
            for n, padded in enumerate(batches):
                parts.append(_batch_topk(teacher, padded, k, compute, recorder))
                if log:
                    log(min((n + 1) * batch_size, len(rows)), len(rows))
    finally:
        if recorder is not None:
            recorder.remove()
    return _joined(parts, rows)


def streamed_teacher_targets(folder: str | os.PathLike, rows: list[dict], k: int, *, pad_id: int,
                             batch_size: int = 8, compute: ComputeChoice | None = None,
                             dtype="auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """compute_teacher_targets of a teacher checkpoint on disk, one decoder layer in memory at a time (a
    teacher bigger than memory): the rows' hidden states stay in memory and each layer is read once."""
    batches = _padded_batches(rows, pad_id, batch_size)
    inputs = [(padded["input_ids"], padded["attention_mask"]) for padded in batches]
    parts = []
    with torch.no_grad(), compute.autocast() if compute is not None else contextlib.nullcontext():
        for model, i in streamed_forwards(folder, inputs, dtype=dtype, batch_size=batch_size,
                                          desc=f"teacher top-{k} (streaming)"):
            parts.append(_batch_topk(model, batches[i], k, None))
    return _joined(parts, rows)


def _padded_batches(rows: list[dict], pad_id: int, batch_size: int) -> list[dict]:
    # padded as the trainer pads, so the targets line up with its batches
    return [PadCollator(pad_id)(rows[start:start + batch_size]) for start in range(0, len(rows), batch_size)]


def _batch_topk(model: nn.Module, padded: dict, k: int, compute: ComputeChoice | None, recorder=None):
    """(values fp32, indices int32[, states bf16]) of the top-k logits (and the recorder's layer states) at
    the batch's labelled positions."""
    _, head, softcap = causal_lm_parts(model)
    device = next(model.parameters()).device
    ids, labels, mask = (padded[name].to(device) for name in ("input_ids", "labels", "attention_mask"))
    values, indices = [], []
    with compute.autocast() if compute is not None else contextlib.nullcontext():
        hidden, _ = labelled_positions(model, ids, mask, labels)
        for chunk in hidden.split(1024):
            top = head_logits(head, chunk, softcap).topk(k, dim=-1)
            values.append(top.values.float().cpu())
            indices.append(top.indices.to(torch.int32).cpu())
    states = () if recorder is None else (recorder.at_labels(labels).to(torch.bfloat16).cpu(),)
    if not values:  # a batch with no labelled position (all prompt)
        return (torch.empty(0, k), torch.empty(0, k, dtype=torch.int32), *states)
    return (torch.cat(values), torch.cat(indices), *states)


def _joined(parts: list, rows: list[dict]):
    offsets = [0]
    for r in rows:
        offsets.append(offsets[-1] + sum(1 for label in r["labels"][1:] if label != IGNORE_INDEX))
    joined = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
              torch.tensor(offsets, dtype=torch.long))
    if parts and len(parts[0]) == 3:
        joined += (torch.cat([p[2] for p in parts]),)
    return joined


def teacher_targets(teacher: nn.Module | str | os.PathLike, rows: list[dict], k: int, *, pad_id: int,
                    cache_dir: str | os.PathLike, batch_size: int = 8, compute: ComputeChoice | None = None,
                    log=None, state_layers: list[int] = ()) -> tuple[TeacherTargets, bool]:
    """The teacher's top-k targets of `rows`, from the cache when present; returns (targets, from_cache).
    teacher: the loaded model, or a checkpoint folder to run one layer at a time (bigger than memory).
    state_layers: also keep those layers' output states (distillation on the hidden states at the cuts)."""
    from safetensors.torch import save_file

    on_disk = not isinstance(teacher, nn.Module)
    fingerprint = folder_fingerprint(teacher, cache_dir) if on_disk else teacher_fingerprint(teacher, cache_dir)
    key = {"teacher": fingerprint, "rows": rows_fingerprint(rows), "k": k,
           "compute": compute.dtype if compute is not None else "none"}
    if state_layers:
        if on_disk:
            raise LayerpruneError("distill_hidden needs the teacher in memory; a teacher read layer by layer from "
                                  "disk gives its top-k logits only (set distill_hidden 0)")
        key["states_after_layers"] = list(state_layers)
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = Path(cache_dir) / f"teacher-top{k}-{name}.safetensors"
    if path.is_file():
        cached = load_cached(path, len(rows), k, _vocab_size(teacher), states=len(state_layers))
        if cached is not None:
            return TeacherTargets(*cached[:3], {**key, "file": str(path)}, *cached[3:]), True
    states = []
    if on_disk:
        values, indices, offsets = streamed_teacher_targets(teacher, rows, k, pad_id=pad_id, batch_size=batch_size,
                                                            compute=compute)
    else:
        values, indices, offsets, *states = compute_teacher_targets(teacher, rows, k, pad_id=pad_id,
                                                                    batch_size=batch_size, compute=compute, log=log,
                                                                    state_layers=state_layers)
    tensors = {"values": values, "indices": indices, "offsets": offsets, **({"states": states[0]} if states else {})}
    try:  # under a temporary name of this process, then one rename: a reader never sees half a file
        publish_file(path, lambda tmp: save_file(tensors, str(tmp), metadata={k_: str(v) for k_, v in key.items()}))
    except Exception as err:
        full = disk_full_message(err, path.parent)
        if full is not None:  # safetensors reports it in its own words
            raise LayerpruneError(full) from None
        raise
    return TeacherTargets(values, indices, offsets, {**key, "file": str(path)}, *states[:1]), False


def _vocab_size(teacher) -> int:
    if not isinstance(teacher, nn.Module):  # a folder: its config says

        return int(read_model_config(Path(teacher)).get_text_config().vocab_size)
    _, head, _ = causal_lm_parts(teacher)
    return int(head.weight.shape[0])
