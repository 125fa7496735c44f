"""Expert scores one decoder layer at a time, for mixture-of-experts models bigger than memory
(`score --expert-metric ... --streaming`, `prune --no-load --expert-ratio`).

The checkpoint is a skeleton on the meta device (models/layer_stream.py); the calibration batches' inputs
to layer 0 are recorded, then each layer's weights are read (per-expert tensors fused as transformers fuses
them), every batch goes through it with the routing hook of a loaded model's pass on its experts module
(routing.py), and the weights are dropped again. The statistics, and so the scores, are those of the loaded
model's pass up to float rounding.
"""

from __future__ import annotations

import os

import torch

from layerprune.importance.experts.registry import compute_expert_scores
from layerprune.importance.experts.routing import LayerRouting, watch_routing
from layerprune.importance.streaming import refuse_non_finite
from layerprune.models.anatomy import get_anatomy
from layerprune.models.checkpoint import read_checkpoint
from layerprune.models.experts.anatomy import moe_layers
from layerprune.models.layer_stream import CheckpointWeights, layer_inputs, local_folder, run_layer, skeleton


def stream_expert_scores(model_dir: str | os.PathLike, metrics: dict[str, dict] | str, calibration=None, *,
                         dtype: str | torch.dtype = "auto", batch_size: int = 8):
    """Like `compute_expert_scores(load_model(model_dir).model, metrics, calibration)`, one layer in memory at
    a time."""
    model, routing = streamed(model_dir, dtype)
    return compute_expert_scores(model, metrics, calibration, batch_size=batch_size, routing=routing)


def streamed(model_dir: str | os.PathLike, dtype: str | torch.dtype = "auto"):
    """(the checkpoint's skeleton, the routing pass over it one layer at a time): what compute_expert_scores
    and selection's choose_experts take as `routing` for a model left on disk."""
    folder = local_folder(model_dir)
    entries = {entry.name: entry for entry in read_checkpoint(folder)}
    model = skeleton(folder, dtype, entries)
    weights = CheckpointWeights(folder, entries, model, get_anatomy(model).layers_path)

    def routing(model, calibration, *, batch_size: int, outputs: bool) -> dict[int, LayerRouting]:
        return streamed_routing(model, weights, calibration, batch_size=batch_size, outputs=outputs)

    return model, routing


def streamed_routing(model, weights: CheckpointWeights, calibration, *, batch_size: int, outputs: bool
                     ) -> dict[int, LayerRouting]:
    """{ORIGINAL layer: LayerRouting} over the calibration tokens, one decoder layer loaded at a time."""
    anatomy = get_anatomy(model)
    by_position = {layer.position: layer for layer in moe_layers(model)}
    stats = {layer.original: LayerRouting(layer.num_experts) for layer in by_position.values()}
    batches = layer_inputs(model, weights, calibration, batch_size)
    for i, block in enumerate(anatomy.layers):
        if i > max(by_position, default=-1):
            break  # no MoE layer follows: nothing more to record
        loaded = weights.load(f"{anatomy.layers_path}.{i}.", block)
        try:
            refuse_non_finite(block, f"{anatomy.layers_path}.{i}.")
            if i not in by_position:
                run_layer(block, i, batches)
                continue
            layer, state = by_position[i], {}
            handle = watch_routing(layer, stats[layer.original], state, outputs)
            try:
                run_layer(block, i, batches, before=lambda batch: state.update(mask=batch["mask"]))
            finally:
                handle.remove()
        finally:
            weights.unload(loaded)
    return stats
