"""Score the layers of a checkpoint on disk with one decoder layer in memory at a time.

For models that do not fit in memory. The model is built as a skeleton on the meta device
(accelerate's `init_empty_weights`: parameters take no memory, buffers such as rotary
frequencies are real), then:

1. the embeddings are read from the checkpoint and the calibration set goes through a forward
   whose decoder layers are stand-ins: each records the arguments the model hands it (causal or
   sliding-window mask, rotary position embeddings, ...; computed by the model's own code, so no
   family-specific knowledge is needed) and the last one stops the forward;
2. for each layer: its weights are read from the shards (safetensors `safe_open`, one layer's
   tensors), the hidden states of every calibration batch go through it with the recorded
   arguments, the metric statistics are accumulated, and its weights are dropped again.

Peak memory: one layer's weights + the embeddings during step 1 + the calibration activations
(N x L x H). The statistics come from the same functions as the in-memory pass
(`activations.ActivationAccumulator`, `weights.scored_parameters` and its norms), so the scores equal
`compute_many` on the loaded model. Streamable: block-influence, relative-magnitude, angular,
magnitude-l1, magnitude-l2, and the order baselines (which need only the layer count).
Not streamed: perplexity and taylor (they need whole-model forwards or gradients).

This module registers nothing and is not imported by `layerprune.importance`.
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.importance.activations import ActivationAccumulator, check_requests, finish_activation_metrics
from layerprune.importance.base import LayerScores
from layerprune.importance.registry import compute_scores, get_metric, to_layer_scores
from layerprune.importance.weights import frobenius_norms_sum, l1_norm, scored_parameters
from layerprune.models.anatomy import get_anatomy
from layerprune.models.checkpoint import read_checkpoint
from layerprune.models.decoder_calls import hidden_of
from layerprune.models.finite import non_finite_parameters
from layerprune.models.layer_stream import CheckpointWeights, layer_inputs, local_folder, skeleton
from layerprune.models.loading import LoadedModel, folder_tokenizer

ACTIVATION_METRICS = ("block-influence", "relative-magnitude", "angular")
WEIGHT_NORMS = {"magnitude-l1": l1_norm, "magnitude-l2": frobenius_norms_sum}
ORDER_METRICS = ("reverse-order", "sequential", "random")
STREAMABLE = (*ACTIVATION_METRICS, *WEIGHT_NORMS, *ORDER_METRICS)


def stream_scores(
    model_dir: str | os.PathLike,
    calibration=None,
    metrics: list[str] | dict[str, dict] = ("block-influence",),
    *,
    dtype: str | torch.dtype = "auto",
) -> dict[str, LayerScores]:
    """Like `compute_many(load_model(model_dir).model, metrics, calibration)`, one layer in memory at a time.

    metrics: names, or {name: params} as for compute_many (e.g. {"angular": {"block_size": 2}}).
    dtype: the weights' dtype while computing ("auto": as stored, like load_model).
    """
    requests = {name: {} for name in metrics} if not isinstance(metrics, dict) else dict(metrics)
    check_streamable(requests)
    for name in requests:
        if get_metric(name).needs_calibration and calibration is None:
            raise LayerpruneError(f"metric {name!r} needs calibration data")
    folder = local_folder(model_dir)
    entries = {entry.name: entry for entry in read_checkpoint(folder)}
    model = skeleton(folder, dtype, entries)
    anatomy = get_anatomy(model)
    n = anatomy.num_layers
    weights = CheckpointWeights(folder, entries, model, anatomy.layers_path)

    acts = {name: params for name, params in requests.items() if name in ACTIVATION_METRICS}
    norms = {name: params for name, params in requests.items() if name in WEIGHT_NORMS}
    for name, params in norms.items():
        if set(params) - {"include_norms"}:
            raise LayerpruneError(f"metric {name!r} got unknown parameter(s) {sorted(set(params) - {'include_norms'})}")
    acc = batches = None
    if acts:
        batch_size = check_requests(acts, n)  # fails before any work
        batches = layer_inputs(model, weights, calibration, batch_size)
        acc = ActivationAccumulator(n, "block-influence" in acts, "relative-magnitude" in acts, "angular" in acts)
    sums = {name: [] for name in norms}
    if acts or norms:
        for i, block in enumerate(anatomy.layers):
            loaded = weights.load(f"{anatomy.layers_path}.{i}.", block)
            try:
                refuse_non_finite(block, f"{anatomy.layers_path}.{i}.")
                for name, params in norms.items():
                    scored = scored_parameters(block, params.get("include_norms", False))
                    sums[name].append(math.fsum(WEIGHT_NORMS[name](p) for _, p in scored))
                if acc is not None:
                    observe_layer(block, i, batches, acc)
            finally:
                weights.unload(loaded)

    results: dict[str, object] = finish_activation_metrics(acc, n, acts) if acc is not None else {}
    results.update(sums)
    scores = {}
    for name, params in requests.items():
        if name in ORDER_METRICS:
            scores[name] = compute_scores(model, name, None, **params)  # they read the layer count only
        else:
            scores[name] = to_layer_scores(model, name, results[name], params, calibration)
    return scores


def refuse_non_finite(block: nn.Module, prefix: str) -> None:
    """One error naming the tensors before a layer is scored: NaN would spread to every score."""
    bad = non_finite_parameters(block)
    if bad:
        names = ", ".join(prefix + name for name in bad[:3])
        raise LayerpruneError(f"the model holds NaN or infinite weights in {names}; its scores would be NaN, so "
                              "nothing could be chosen on them; repair or re-download the model")


def check_streamable(metrics) -> None:
    """Raise LayerpruneError for an unknown metric or one that needs the whole model at once."""
    if not metrics:
        raise LayerpruneError("no metric to stream")
    for name in metrics:
        get_metric(name)  # unknown names: the registry's error
        if name not in STREAMABLE:
            raise LayerpruneError(
                f"metric {name!r} can't be computed one layer at a time (streamable: {', '.join(STREAMABLE)}); "
                "score it on the loaded model, without --streaming"
            )


def load_skeleton(ref: str | os.PathLike, *, dtype: str | torch.dtype = "auto", metrics=None):
    """A LoadedModel whose weights stay on disk (meta device) + its tokenizer: what `score --streaming` needs
    to know the layers and encode calibration text. `metrics` are checked first."""
    if metrics is not None:
        check_streamable(metrics)
    folder = local_folder(ref)
    model = skeleton(folder, dtype, {e.name: e for e in read_checkpoint(folder)})
    return LoadedModel(model=model, tokenizer=folder_tokenizer(folder), ref=str(ref), path=str(folder))


def observe_layer(block: nn.Module, i: int, batches: list[dict], acc: ActivationAccumulator) -> None:
    """Push every batch's hidden states through layer i; its output becomes the next layer's input."""
    with torch.no_grad():
        for batch in batches:
            rest, kwargs = batch["calls"][i]
            x = batch["hidden"]
            y = hidden_of(block(x, *rest, **kwargs))
            acc.mask = batch["mask"]
            acc.observe(i, x, y)
            batch["hidden"] = y
