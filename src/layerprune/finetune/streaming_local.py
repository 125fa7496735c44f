"""`replace` and `block-local` healing of a checkpoint on disk, one decoder layer in memory at a time (models
bigger than memory). block-local trains the `local_layers` layers before each cut the same way, from their
inputs cached while the student streams, and writes them back.

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
    DEFAULT_LOCAL_ROWS,
    Capture,
    LeastSquares,
    cut_positions,
    cuts,
    fold_linear_map,
    mlp_output_projection,
    replace_unsupported,
    row_batches,
    train_span,
)
from layerprune.hardware.compute import compute_choice
from layerprune.models.anatomy import get_anatomy
from layerprune.models.checkpoint import read_checkpoint
from layerprune.models.decoder_calls import hidden_of
from layerprune.models.layer_stream import CheckpointWeights, layer_inputs, run_layer, skeleton
from layerprune.models.surgery import kept_layers


def stream_heal(student_dir: str | os.PathLike, teacher_dir: str | os.PathLike, rows: list[dict], config, *,
                pad_id: int, log=print) -> tuple[dict[str, torch.Tensor], dict]:
    """({checkpoint tensor name: new value}, notes) of `replace` or `block-local` healing, one layer (or one
    cut's span of `local_layers` layers) in memory at a time."""
    rows = rows[:config.max_samples or DEFAULT_LOCAL_ROWS]
    batches = list(row_batches(rows, pad_id, config.batch_size, "cpu"))
    student, s_weights = _open(student_dir)
    teacher, t_weights = _open(teacher_dir)
    why = replace_unsupported(student) if config.method == "replace" else None
    if why is not None:
        raise LayerpruneError(why)
    where = {cut: cut_positions(student, teacher, *cut) for cut in cuts(student)}
    before_cut = {pos[0]: (cut, pos[1]) for cut, pos in where.items() if pos is not None}
    spans = _spans(before_cut, config)  # overlapping spans are refused before the teacher pass
    targets = _teacher_streams(teacher, t_weights, batches, {t for _, t in before_cut.values()}, config.batch_size)
    log(f"{config.method}, streaming: {len(before_cut)} cut(s), {len(rows)} rows; teacher pass done")
    anatomy = get_anatomy(student)
    recorded = layer_inputs(student, s_weights, batches, config.batch_size)
    state = {"replaced": {}, "cuts": [], "curve": []}
    i = 0
    while i < len(anatomy.layers):
        span = spans.get(i, [i])
        prefixes = [f"{anatomy.layers_path}.{j}." for j in span]
        loaded = [name for j, prefix in zip(span, prefixes) for name in s_weights.load(prefix, anatomy.layers[j])]
        try:
            if span[-1] in before_cut and config.method == "replace":
                _fold(anatomy.layers[i], i, recorded, targets[before_cut[i][1]], batches, s_weights, prefixes[0],
                      before_cut[i][0], state)
            elif span[-1] in before_cut:
                _train(anatomy, span, recorded, targets[before_cut[span[-1]][1]], batches, s_weights, prefixes,
                       before_cut[span[-1]][0], config, state, student)
            else:
                run_layer(anatomy.layers[i], i, recorded)
        finally:
            s_weights.unload(loaded)
        i = span[-1] + 1
    notes = {"cuts": state["cuts"], "changed_params": sum(v.numel() for v in state["replaced"].values()),
             "streaming": True}
    if config.method == "replace":
        notes["tokens"] = sum(f["tokens"] for f in state["cuts"])
    else:
        notes.update(loss_curve=state["curve"], tokens=sum(len(r["input_ids"]) for r in rows))
    skipped = [list(cut) for cut, pos in where.items() if pos is None]
    if skipped:
        notes["skipped_cuts"] = skipped
    return state["replaced"], notes


def _spans(before_cut: dict, config) -> dict[int, list[int]]:
    """block-local: {first layer of a span: the span's positions}; spans that overlap cannot be streamed."""
    if config.method != "block-local":
        return {}
    spans, taken = {}, set()
    for position in sorted(before_cut):
        span = list(range(max(0, position - config.local_layers + 1), position + 1))
        if taken & set(span) or (spans and span[0] <= max(taken)):
            raise LayerpruneError(f"--streaming trains the {config.local_layers} layers before each cut at once, "
                                  "and two cuts' layers overlap here; use local_layers 1 or heal in memory")
        spans[span[0]] = span
        taken |= set(span)
    return spans


def _fold(layer, i: int, recorded, targets, batches, weights: CheckpointWeights, prefix: str, cut, state) -> None:
    """replace: fit the cut's map from this layer's MLP output, fold it in, and apply the layer again."""
    inputs = [batch["hidden"] for batch in recorded]
    projection = mlp_output_projection(layer)
    fit = LeastSquares()
    for batch, target, (_, mask) in zip(recorded, targets, batches):
        with Capture({"layer": layer, "mlp": projection}) as seen:
            run_layer(layer, i, [batch])
        fit.add(seen.values["mlp"], seen.values["layer"], target, mask)
    fold_linear_map(projection, fit.solve())
    for batch, hidden in zip(recorded, inputs):  # again, with the folded weights
        batch["hidden"] = hidden
    run_layer(layer, i, recorded)
    path = next(name for name, module in layer.named_modules() if module is projection)
    for local, value in projection.named_parameters():
        state["replaced"][weights.checkpoint_name(f"{prefix}{path}.{local}")] = value.detach().clone()
    state["cuts"].append({"cut": list(cut), "into_layer": cut[0] - 1, "tokens": fit.tokens})


def _train(anatomy, span: list[int], recorded, targets, batches, weights: CheckpointWeights, prefixes: list[str],
           cut, config, state, student) -> None:
    """block-local: train the span's layers on their cached inputs toward the teacher's stream, then apply them."""
    layers = [anatomy.layers[j] for j in span]

    def forward(b: int) -> torch.Tensor:
        hidden = recorded[b]["hidden"]
        for j, layer in zip(span, layers):
            rest, kwargs = recorded[b]["calls"][j]
            hidden = hidden_of(layer(hidden, *rest, **kwargs))
        return hidden

    params = [p for layer in layers for p in layer.parameters()]
    compute = compute_choice("cpu", config.bf16)
    steps = train_span(params, forward, [(t, mask.bool()) for t, (_, mask) in zip(targets, batches)], config,
                       compute, state["curve"])
    for j, layer in zip(span, layers):
        run_layer(layer, j, recorded)
    for prefix, layer in zip(prefixes, layers):
        for local, value in layer.named_parameters():
            state["replaced"][weights.checkpoint_name(prefix + local)] = value.detach().clone()
    state["cuts"].append({"cut": list(cut), "trained_layers": [kept_layers(student)[j] for j in span],
                          "steps": steps})


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
    if kept != list(range(len(kept))):
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
