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
from pathlib import Path

import torch
from torch import nn

from layerprune.errors import LayerpruneError, first_line
from layerprune.importance.activations import (
    ActivationAccumulator,
    check_requests,
    finish_activation_metrics,
    hidden_of,
    last_logits_kwargs,
    layer_input,
)
from layerprune.importance.base import LayerScores
from layerprune.importance.registry import to_layer_scores, compute_scores, get_metric
from layerprune.importance.weights import frobenius_norms_sum, l1_norm, scored_parameters
from layerprune.models.anatomy import get_anatomy
from layerprune.models.checkpoint import TensorEntry, find_layers_prefix, read_checkpoint
from layerprune.models.dtypes import parse_dtype, stored_dtype

ACTIVATION_METRICS = ("block-influence", "relative-magnitude", "angular")
WEIGHT_NORMS = {"magnitude-l1": l1_norm, "magnitude-l2": frobenius_norms_sum}
ORDER_METRICS = ("reverse-order", "sequential", "random")
STREAMABLE = (*ACTIVATION_METRICS, *WEIGHT_NORMS, *ORDER_METRICS)

_SAFETENSORS_FLOATS = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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
    folder = _local_folder(model_dir)
    entries = {entry.name: entry for entry in read_checkpoint(folder)}
    model = _skeleton(folder, dtype, entries)
    anatomy = get_anatomy(model)
    n = anatomy.num_layers
    weights = _CheckpointWeights(folder, entries, model, anatomy.layers_path)

    acts = {name: params for name, params in requests.items() if name in ACTIVATION_METRICS}
    norms = {name: params for name, params in requests.items() if name in WEIGHT_NORMS}
    for name, params in norms.items():
        if set(params) - {"include_norms"}:
            raise LayerpruneError(f"metric {name!r} got unknown parameter(s) {sorted(set(params) - {'include_norms'})}")
    acc = batches = None
    if acts:
        batch_size = check_requests(acts, n)  # fails before any work
        batches = _layer_inputs(model, weights, calibration, batch_size)
        acc = ActivationAccumulator(n, "block-influence" in acts, "relative-magnitude" in acts, "angular" in acts)
    sums = {name: [] for name in norms}
    if acts or norms:
        for i, block in enumerate(anatomy.layers):
            loaded = weights.load(f"{anatomy.layers_path}.{i}.", block)
            try:
                for name, params in norms.items():
                    scored = scored_parameters(block, params.get("include_norms", False))
                    sums[name].append(math.fsum(WEIGHT_NORMS[name](p) for _, p in scored))
                if acc is not None:
                    _run_layer(block, i, batches, acc)
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
    from layerprune.models.loading import LoadedModel, folder_tokenizer

    if metrics is not None:
        check_streamable(metrics)
    folder = _local_folder(ref)
    model = _skeleton(folder, dtype, {e.name: e for e in read_checkpoint(folder)})
    return LoadedModel(model=model, tokenizer=folder_tokenizer(folder), ref=str(ref), path=str(folder))


def _local_folder(ref: str | os.PathLike) -> Path:
    """The Hugging Face folder of a reference (aliases and GGUF files are converted once); no hub ids."""
    from layerprune.models.loading import model_folder, resolve_model_ref

    if resolve_model_ref(ref).kind == "hub":
        raise LayerpruneError(f"streaming reads a local checkpoint; {ref} is a hub id (download it first)")
    return Path(model_folder(ref))


# ---------------------------------------------------------------------------------------------
# The skeleton and its weights
# ---------------------------------------------------------------------------------------------


def _skeleton(folder: Path, dtype, entries: dict[str, TensorEntry]) -> nn.Module:
    """The model with parameters on the meta device and real buffers (rotary frequencies, ...)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from layerprune.models.loading import check_causal_lm
    from layerprune.models.model_config import read_model_config, trusts_remote_code

    trusted = trusts_remote_code()
    check_causal_lm(str(folder), trusted)  # encoders and encoder-decoders are refused as in load_model
    config = read_model_config(folder, trust_remote_code=trusted)
    torch_dtype = _resolve_dtype(config, dtype, entries)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype, trust_remote_code=trusted)
    except ValueError as err:
        raise LayerpruneError(
            f"unsupported architecture {config.model_type!r} in {folder}: {first_line(err)}"
        ) from err
    return model.eval()


def _resolve_dtype(config, dtype, entries: dict[str, TensorEntry]) -> torch.dtype:
    """dtype "auto" as from_pretrained reads it: the config's dtype, else the first stored float tensor's."""
    dtype = parse_dtype(dtype)
    if dtype != "auto":
        return dtype
    stored = stored_dtype(config)
    if stored is not None:
        return stored
    for entry in entries.values():
        if entry.dtype in _SAFETENSORS_FLOATS:
            return _SAFETENSORS_FLOATS[entry.dtype]
    return torch.float32


class _CheckpointWeights:
    """Puts tensors of the checkpoint into the skeleton and takes them out again.

    Names are matched as stored, or without the *ForCausalLM wrapper prefix (GPT-2's `h.0...`
    for `transformer.h.0...`). Each load opens the shard files it needs with safe_open and lets
    them go with the tensors, so mapped pages are released with the layer.
    """

    def __init__(self, folder: Path, entries: dict[str, TensorEntry], model: nn.Module, layers_path: str):
        self.folder = folder
        self.entries = entries
        self.model = model
        prefix = find_layers_prefix(entries, layers_path)
        self.wrapper = layers_path[: len(layers_path) - len(prefix)]  # "transformer." or ""

    def checkpoint_name(self, name: str) -> str | None:
        if name in self.entries:
            return name
        if self.wrapper and name.startswith(self.wrapper) and name[len(self.wrapper):] in self.entries:
            return name[len(self.wrapper):]
        return None

    def load(self, prefix: str, module: nn.Module) -> list[str]:
        """Materialise every parameter (and stored buffer) of `module`, whose full name starts with prefix."""
        wanted: dict[str, str] = {}
        missing = []
        for local, _ in module.named_parameters():
            stored = self.checkpoint_name(prefix + local)
            if stored is None:
                missing.append(prefix + local)
            wanted[prefix + local] = stored
        if missing:
            raise LayerpruneError(
                f"the checkpoint has no tensor for {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + "; streaming needs tensors stored under the model's own parameter names (models whose weights "
                "transformers converts on load, such as fused MoE experts, are scored in memory)"
            )
        for local, _ in module.named_buffers():
            stored = self.checkpoint_name(prefix + local)
            if stored is not None:
                wanted[prefix + local] = stored
        return self.read(wanted)

    def read(self, wanted: dict[str, str]) -> list[str]:
        from safetensors import safe_open

        by_file: dict[str, list[tuple[str, str]]] = {}
        for name, stored in wanted.items():
            by_file.setdefault(self.entries[stored].file, []).append((name, stored))
        for file, pairs in by_file.items():
            with safe_open(self.folder / file, framework="pt", device="cpu") as f:
                for name, stored in pairs:
                    _set_tensor(self.model, name, f.get_tensor(stored))
        return list(wanted)

    def unload(self, names: list[str]) -> None:
        for name in names:
            _set_tensor(self.model, name, None)


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor | None) -> None:
    """Replace a parameter or buffer by `value` cast to its dtype; None puts it back on the meta device."""
    module_path, _, attr = name.rpartition(".")
    module = model.get_submodule(module_path)
    old = module._parameters.get(attr) if attr in module._parameters else module._buffers[attr]
    if value is None:
        value = torch.empty_like(old, device="meta")
    elif value.is_floating_point() and old.is_floating_point():
        value = value.to(old.dtype)
    if value.shape != old.shape:
        raise LayerpruneError(
            f"tensor {name} has shape {tuple(value.shape)} in the checkpoint, {tuple(old.shape)} in the model"
        )
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


# ---------------------------------------------------------------------------------------------
# Activations, one layer at a time
# ---------------------------------------------------------------------------------------------


class _Recorded(Exception):
    """Stops the capture forward once the last layer's arguments are recorded."""


def _layer_inputs(model: nn.Module, weights: _CheckpointWeights, calibration, batch_size: int) -> list[dict]:
    """Per calibration batch: the first layer's input and every layer's other arguments.

    A forward of the model with its layers replaced by recorders, so masks (causal, sliding window)
    and position embeddings come from the model's own code, exactly as in a normal forward.
    """
    if batch_size < 1:
        raise LayerpruneError(f"batch_size must be >= 1, got {batch_size}")
    anatomy = get_anatomy(model)
    layers = anatomy.layers
    n = len(layers)
    layer_ids = {id(p) for p in layers.parameters()}
    head = anatomy.lm_head
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    embedding_ids = {id(p) for p in anatomy.embeddings.parameters()}
    # Everything outside the layers that the forward may touch before layer 0; not an untied lm_head.
    outside = [
        name for name, p in model.named_parameters()
        if id(p) not in layer_ids and (id(p) not in head_ids or id(p) in embedding_ids)
    ]
    current: dict = {}

    def recorder(i: int):
        def forward(*args, **kwargs):
            hidden = layer_input(args, kwargs)
            rest = args[1:] if args else ()
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"} if not args else kwargs
            if i == 0:
                current["hidden"] = hidden
            current["calls"].append((rest, kwargs))
            if i == n - 1:
                raise _Recorded
            return hidden

        return forward

    batches = []
    loaded = []
    extra = last_logits_kwargs(model)
    try:
        for name in outside:
            loaded += weights.read({name: _required(weights, name)})
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        with torch.no_grad():
            for ids, mask in calibration.nonempty_batches(batch_size):
                current.clear()
                current["calls"] = []
                try:
                    model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
                except _Recorded:
                    pass
                if len(current["calls"]) != n:
                    raise LayerpruneError(f"the model called {len(current['calls'])} of its {n} layers in a forward")
                batches.append({"hidden": current["hidden"], "mask": mask, "calls": current["calls"]})
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)
        weights.unload(loaded)
    return batches


def _required(weights: _CheckpointWeights, name: str) -> str:
    stored = weights.checkpoint_name(name)
    if stored is None:
        raise LayerpruneError(f"the checkpoint has no tensor for {name}")
    return stored


def _run_layer(block: nn.Module, i: int, batches: list[dict], acc: ActivationAccumulator) -> None:
    """Push every batch's hidden states through layer i; its output becomes the next layer's input."""
    with torch.no_grad():
        for batch in batches:
            rest, kwargs = batch["calls"][i]
            x = batch["hidden"]
            y = hidden_of(block(x, *rest, **kwargs))
            acc.mask = batch["mask"]
            acc.observe(i, x, y)
            batch["hidden"] = y
