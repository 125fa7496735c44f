"""Perplexity (PPL) importance: how much the calibration perplexity rises when one block is removed.

Shortened LLaMA (Kim et al., 2024, Sec. 3.1 "Perplexity (PPL)") scores block n by

    I_PPL^n = exp( -1/(S L) * sum_s sum_l log p_{theta^n}(x_l^(s) | x_<l^(s)) )

where theta^n is the model without its n-th block and s, l run over the calibration
sequences and their tokens; "Reassessing Layer Pruning" (Sec. 3.1) uses it as one of its
data-driven metrics. Removing an important block raises the perplexity, so the PPL is
already "higher = more important = kept" and is returned as is (no negation).

Perplexity here = exp(total NLL / number of predicted tokens) over the whole calibration
set: NLL sums and token counts are accumulated across batches (never per-batch means). A
prediction counts when both the predicting and the predicted token are real (mask 1);
for right padding that is exactly HF's `labels = input_ids, padding = -100`, and for
left padding it also drops the prediction made from a padding position.

Two methods, same numbers (up to float rounding):

- ``naive``: for each block i, run the whole model with block i replaced by a
  pass-through: n(n-1) block forwards per chunk of samples (plus n for the baseline).
- ``fast`` (default): run the intact model once per chunk and cache the input hidden
  states X_i of blocks 1..n-1. Removing block i leaves blocks 0..i-1 unchanged, so for
  candidate i the model only has to resume from X_i and run blocks i+1..n-1:
  n(n-1)/2 block forwards per chunk (plus n for the caching pass). To get the head
  exactly right for every family (final norm, OPT's project_out, Gemma2's logit
  softcapping, ...) the model's own forward runs: blocks 0..i-1 are swapped for free
  pass-throughs and block i for a stand-in that returns the cached X_i, so the model
  itself recomputes masks / position embeddings for blocks i+1.. and applies its head.
  (That is why the per-block kwargs need not be cached: the model's forward rebuilds
  them deterministically from the same input_ids and attention_mask.)

Every candidate still pays for the embeddings and the head (lm_head + log-softmax over
the vocabulary), the same in both methods. With h = head cost in block units, the time
ratio fast/naive is about (n + n(n-1)/2 + (n+1)h) / (n + n(n-1) + (n+1)h): close to 1/2
for large models, higher for small ones with a large vocabulary (SmolLM2-135M: h ~ 7).

Memory of the fast method (beyond one ordinary forward of B samples):
    cache = (n - 1) * B * L * d * bytes_per_element(model dtype)
with B = `batch_size` (the samples per chunk; default: all N), L = sequence length,
d = hidden size. X_0 (the embeddings) is not cached: candidate 0 is a plain pass-through.
`offload=True` keeps the cache in host memory and copies one X_i to the device per
candidate; `offload="auto"` does so when the cache would take over half of the free
memory of a CUDA device. Logits cost B * L * vocab * bytes as in any forward; the NLL is
computed in float32 one sample at a time.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.importance.registry import register_metric
from layerprune.models.anatomy import Anatomy, get_anatomy
from layerprune.models.bypass import StandIn, swapped
from layerprune.models.decoder_calls import layer_input

METHODS = ("fast", "naive")


# ---------------------------------------------------------------- perplexity arithmetic


def predicted_positions(attention_mask: torch.Tensor, scored: torch.Tensor | None = None,
                        device: torch.device | None = None) -> torch.Tensor:
    """[B, L-1] bool: position t predicts token t+1 and counts. Both tokens must be real (mask 1); with
    `scored` ([B, L], 1 on the tokens to score, e.g. only a multiple-choice answer), token t+1 must be one."""
    mask = attention_mask.to(device).bool()
    valid = mask[:, 1:] & mask[:, :-1]
    return valid if scored is None else valid & scored[:, 1:].to(device).bool()


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              scored: torch.Tensor | None = None) -> tuple[float, int]:
    """Sum of next-token NLL (float32) and the number of predicted tokens, padding excluded (and, with
    `scored`, every token it does not mark: see predicted_positions)."""
    targets = input_ids[:, 1:].to(logits.device)
    valid = predicted_positions(attention_mask, scored, logits.device)
    total = 0.0
    # One sample at a time: a float32 copy of [L, vocab] instead of [B, L, vocab].
    for b in range(logits.shape[0]):
        keep = valid[b]
        if keep.any():
            rows = logits[b, :-1][keep].float()
            total += float(F.cross_entropy(rows, targets[b][keep], reduction="sum"))
    return total, int(valid.sum())


def _perplexity(nll: float, tokens: int) -> float:
    return math.exp(nll / tokens)


# ---------------------------------------------------------------- hooks


@dataclass
class _Capture:
    """What the intact model's pass left behind for one chunk."""

    logits: torch.Tensor
    tails: list[tuple | None]  # per block: None (returns a tensor) or the tuple's tail
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # X_i for i >= 1


@contextlib.contextmanager
def counting_calls(layers: nn.ModuleList) -> Iterator[list[int]]:
    """Count real block forward calls (stand-ins are not blocks, so they never count)."""
    count = [0]

    def hook(module, args, output):
        count[0] += 1

    handles = [block.register_forward_hook(hook) for block in layers]
    try:
        yield count
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while scoring; every module's own training flag is put back afterwards."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


def forward_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    return out.logits


def capture_pass(
    model: nn.Module,
    layers: nn.ModuleList,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    keep_inputs: bool,
    store: torch.device | None,
) -> _Capture:
    """Run the intact model; record each block's output form and (optionally) its input X_i."""
    tails: list[tuple | None] = [None] * len(layers)
    inputs: dict[int, torch.Tensor] = {}
    handles = []

    def pre_hook(pos: int):
        def hook(module, args, kwargs):
            hidden = layer_input(args, kwargs)
            # A copy: the cache must not alias an activation that a block could modify in place.
            inputs[pos] = hidden.detach().to(device=store or hidden.device, copy=True)

        return hook

    def post_hook(pos: int):
        def hook(module, args, kwargs, output):
            tails[pos] = tuple(output[1:]) if isinstance(output, tuple) else None

        return hook

    try:
        for pos, block in enumerate(layers):
            if keep_inputs and pos > 0:  # X_0 is never replayed (candidate 0 is a pass-through)
                handles.append(block.register_forward_pre_hook(pre_hook(pos), with_kwargs=True))
            handles.append(block.register_forward_hook(post_hook(pos), with_kwargs=True))
        logits = forward_logits(model, input_ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    if store is not None and store.type == "cpu" and torch.cuda.is_available():
        inputs = {pos: x.pin_memory() for pos, x in inputs.items()}  # faster copies back to the GPU
    return _Capture(logits, tails, inputs)


# ---------------------------------------------------------------- the two methods


def _candidate_naive(model, anatomy: Anatomy, cap: _Capture, i: int, ids, mask) -> torch.Tensor:
    with swapped(anatomy, {i: StandIn(cap.tails[i], block=anatomy.layers[i])}):
        return forward_logits(model, ids, mask)


def _candidate_fast(model, anatomy: Anatomy, cap: _Capture, i: int, ids, mask) -> torch.Tensor:
    # Blocks before i are skipped for free (their output is never read: block i ignores its input)
    # and block i hands out X_i, the state after blocks 0..i-1. For i = 0, X_0 is the embeddings.
    layers = anatomy.layers
    stand_ins = {p: StandIn(cap.tails[p], block=layers[p]) for p in range(i)}
    stand_ins[i] = StandIn(cap.tails[i], cap.inputs.get(i), block=layers[i])
    with swapped(anatomy, stand_ins):
        return forward_logits(model, ids, mask)


def _cache_store(model: nn.Module, offload: bool | str, batch: int, seq_len: int, n: int) -> torch.device | None:
    """Where cached X_i live: None = where the model produced them, or the CPU."""
    if offload is True:
        return torch.device("cpu")
    if offload is False:
        return None
    if offload != "auto":
        raise LayerpruneError(f"offload must be True, False or 'auto', got {offload!r}")
    device = model.get_input_embeddings().weight.device
    if device.type != "cuda":
        return None
    weight = model.get_input_embeddings().weight
    hidden = getattr(get_anatomy(model).text_config, "hidden_size", None) or weight.shape[1]
    need = (n - 1) * batch * seq_len * hidden * weight.element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return torch.device("cpu") if need > free // 2 else None


def _check(model: nn.Module, method: str, batch_size: int | None) -> Anatomy:
    if method not in METHODS:
        raise LayerpruneError(f"unknown perplexity method {method!r}; use one of {', '.join(METHODS)}")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise LayerpruneError(f"batch_size must be a positive integer, got {batch_size!r}")
    anatomy = get_anatomy(model)
    if anatomy.num_layers < 2:
        raise LayerpruneError(
            "the perplexity metric needs at least 2 layers: with one layer there is nothing to compare"
        )
    return anatomy


@register_metric(
    "perplexity",
    needs_calibration=True,
    description="calibration perplexity with the layer removed (Shortened LLaMA PPL); fast: n(n-1)/2 block passes",
    forward_passes=lambda n: 1 + n / 2,  # the intact pass, then each removal resumes from its cached input
)
def perplexity(
    model: nn.Module,
    calibration,
    *,
    method: str = "fast",
    batch_size: int | None = None,
    offload: bool | str = False,
) -> tuple[list[float], dict]:
    """Score of block i = perplexity of the calibration set with block i removed (higher = keep).

    method: "fast" (resume from cached block inputs, n(n-1)/2 block forwards per chunk) or
    "naive" (full model per candidate, n(n-1)). batch_size: samples per chunk (default all);
    only one chunk's cache lives at a time. offload: keep the cache on the CPU (True/"auto").
    Memory of the fast cache: (n-1) * batch_size * seq_len * hidden * bytes per element.
    extra: method, layer_forwards (block forward calls actually run, all passes),
    candidate_layer_forwards, baseline_layer_forwards, baseline_perplexity, tokens, chunks.
    """
    anatomy = _check(model, method, batch_size)
    layers = anatomy.layers
    n = len(layers)
    chunk = batch_size or calibration.num_samples
    store = _cache_store(model, offload, chunk, calibration.seq_len, n) if method == "fast" else None
    candidate = _candidate_fast if method == "fast" else _candidate_naive

    nll = [0.0] * n
    base_nll, tokens, chunks, baseline_calls = 0.0, 0, 0, 0
    with torch.no_grad(), eval_mode(model), counting_calls(layers) as calls:
        for ids, mask in calibration.batches(chunk):
            before = calls[0]
            cap = capture_pass(model, layers, ids, mask, keep_inputs=method == "fast", store=store)
            baseline_calls += calls[0] - before
            chunk_nll, chunk_tokens = token_nll(cap.logits, ids, mask)
            cap.logits = None  # free the baseline logits before the candidates run
            base_nll += chunk_nll
            tokens += chunk_tokens
            chunks += 1
            for i in range(n):
                nll[i] += token_nll(candidate(model, anatomy, cap, i, ids, mask), ids, mask)[0]
            del cap
    if tokens == 0:
        raise LayerpruneError("calibration data has no predicted tokens (every sample has fewer than 2 real tokens)")
    scores = [_perplexity(value, tokens) for value in nll]
    extra = {
        "method": method,
        "layer_forwards": calls[0],
        "candidate_layer_forwards": calls[0] - baseline_calls,
        "baseline_layer_forwards": baseline_calls,
        "baseline_perplexity": _perplexity(base_nll, tokens),
        "tokens": tokens,
        "chunks": chunks,
    }
    return scores, extra


# ---------------------------------------------------------------- whole drop-sets (select: auto / search)
