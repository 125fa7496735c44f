"""`replace` healing of a checkpoint on disk, one decoder layer in memory at a time (models bigger than memory).

The same least-squares fit as finetune/local.py, layer by layer: the healing rows' hidden states stay in
memory (rows x tokens x hidden, fp32). The teacher (the unpruned checkpoint) is streamed first and its
residual stream kept after the last layer of every cut; then the student: each layer is read, applied
to every row and dropped, except the kept layer before a cut, whose MLP output and layer output are
captured, the map T fitted and folded into its MLP output projection, and the layer applied again with
its new weights (later cuts see earlier ones healed, as in memory). The output is the student's
checkpoint with only the folded tensors rewritten (in their stored dtype): every other tensor is copied
byte for byte, shard to shard.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from layerprune.errors import LayerpruneError
from layerprune.finetune.local import (
    DEFAULT_LOCAL_ROWS, Capture, LeastSquares, cut_positions, cuts, fold_linear_map, mlp_output_projection,
    replace_unsupported, row_batches,
)
from layerprune.models.anatomy import get_anatomy
from layerprune.models.checkpoint import read_checkpoint
from layerprune.models.layer_stream import CheckpointWeights, layer_inputs, run_layer, skeleton
from layerprune.models.surgery import kept_layers


def stream_replace(student_dir: str | os.PathLike, teacher_dir: str | os.PathLike, rows: list[dict], config, *,
                   pad_id: int, log=print) -> tuple[dict[str, torch.Tensor], dict]:
    """({checkpoint tensor name: new value}, notes) of `replace` healing, one layer in memory at a time."""
    rows = rows[:config.max_samples or DEFAULT_LOCAL_ROWS]
    batches = list(row_batches(rows, pad_id, config.batch_size, "cpu"))
    student, s_weights = _open(student_dir)
    teacher, t_weights = _open(teacher_dir)
    why = replace_unsupported(student)
    if why is not None:
        raise LayerpruneError(why)
    where = {cut: cut_positions(student, teacher, *cut) for cut in cuts(student)}
    before_cut = {pos[0]: (cut, pos[1]) for cut, pos in where.items() if pos is not None}
    targets = _teacher_streams(teacher, t_weights, batches, {t for _, t in before_cut.values()}, config.batch_size)
    log(f"replace, streaming: {len(before_cut)} cut(s), {len(rows)} rows; teacher pass done")
    anatomy = get_anatomy(student)
    recorded = layer_inputs(student, s_weights, batches, config.batch_size)
    replaced, fitted = {}, []
    for i, layer in enumerate(anatomy.layers):
        prefix = f"{anatomy.layers_path}.{i}."
        loaded = s_weights.load(prefix, layer)
        try:
            if i in before_cut:
                cut, t_position = before_cut[i]
                inputs = [batch["hidden"] for batch in recorded]
                projection = mlp_output_projection(layer)
                fit = LeastSquares()
                for batch, target, (_, mask) in zip(recorded, targets[t_position], batches):
                    with Capture({"layer": layer, "mlp": projection}) as seen:
                        run_layer(layer, i, [batch])
                    fit.add(seen.values["mlp"], seen.values["layer"], target, mask)
                fold_linear_map(projection, fit.solve())
                for batch, hidden in zip(recorded, inputs):  # again, with the folded weights
                    batch["hidden"] = hidden
                run_layer(layer, i, recorded)
                path = next(name for name, module in layer.named_modules() if module is projection)
                for local, value in projection.named_parameters():
                    replaced[s_weights.checkpoint_name(f"{prefix}{path}.{local}")] = value.detach().clone()
                fitted.append({"cut": list(cut), "into_layer": cut[0] - 1, "tokens": fit.tokens})
            else:
                run_layer(layer, i, recorded)
        finally:
            s_weights.unload(loaded)
    skipped = [list(cut) for cut, pos in where.items() if pos is None]
    notes = {"cuts": fitted, "changed_params": sum(v.numel() for v in replaced.values()),
             "tokens": sum(f["tokens"] for f in fitted), "streaming": True, **({"skipped_cuts": skipped} if skipped
                                                                                 else {})}
    return replaced, notes


def _open(folder: str | os.PathLike):
    """The fp32 skeleton of a checkpoint (as `replace` loads models: train_dtype fp32) and its weights."""
    entries = {entry.name: entry for entry in read_checkpoint(Path(folder))}
    model = skeleton(Path(folder), torch.float32, entries)
    return model, CheckpointWeights(Path(folder), entries, model, get_anatomy(model).layers_path)


def _teacher_streams(teacher, weights: CheckpointWeights, batches, positions: set[int], batch_size: int
                     ) -> dict[int, list[torch.Tensor]]:
    """The teacher's residual stream after each of its layers at `positions`, per batch."""
    anatomy = get_anatomy(teacher)
    kept = kept_layers(teacher)
    if len(kept) != kept[-1] + 1 if kept else True:
        raise LayerpruneError("the teacher must be the unpruned model")
    recorded = layer_inputs(teacher, weights, batches, batch_size)
    streams = {}
    last = max(positions, default=-1)
    for i, layer in enumerate(anatomy.layers[:last + 1]):
        loaded = weights.load(f"{anatomy.layers_path}.{i}.", layer)
        try:
            run_layer(layer, i, recorded)
        finally:
            weights.unload(loaded)
        if i in positions:
            streams[i] = [batch["hidden"] for batch in recorded]
    return streams
