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

METHODS = ("fast", "naive")


# ---------------------------------------------------------------- perplexity arithmetic


def token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[float, int]:
    """Sum of next-token NLL (float32) and the number of predicted tokens, padding excluded."""
    targets = input_ids[:, 1:].to(logits.device)
    mask = attention_mask.to(logits.device).bool()
    valid = mask[:, 1:] & mask[:, :-1]
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


# ---------------------------------------------------------------- stand-in blocks


class _StandIn(nn.Module):
    """Takes a block's place without computing it.

    With `value` None it passes its input hidden states through (the block is removed);
    otherwise it returns `value` (a cached hidden state) and ignores its input. `tail` is
    None for blocks that return a tensor, else the rest of the tuple the block returned.
    Other attributes are read from the original `block` (some model forwards read e.g.
    `layer.attention_type`); it is not registered as a submodule, so it is never run.
    """

    def __init__(self, tail: tuple | None, value: torch.Tensor | None = None, block: nn.Module | None = None) -> None:
        super().__init__()
        self.tail = tail
        self.value = value
        object.__setattr__(self, "_block", block)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            block = self.__dict__.get("_block")
            if block is None:
                raise
            return getattr(block, name)

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if self.value is not None:
            # The cache belongs to one chunk of samples; a different batch must never get it.
            if self.value.shape != hidden.shape:
                raise RuntimeError(f"cached hidden states {tuple(self.value.shape)} do not match {tuple(hidden.shape)}")
            hidden = self.value.to(hidden.device, non_blocking=True)
        return hidden if self.tail is None else (hidden,) + self.tail


@contextlib.contextmanager
def _swapped(anatomy: Anatomy, replacements: dict[int, nn.Module]) -> Iterator[None]:
    """Run with some blocks replaced, through a new ModuleList; the original list object comes back."""
    original = anatomy.layers
    anatomy.set_layers(nn.ModuleList([replacements.get(p, block) for p, block in enumerate(original)]))
    try:
        yield
    finally:
        anatomy.set_layers(original)


# ---------------------------------------------------------------- hooks


@dataclass
class _Capture:
    """What the intact model's pass left behind for one chunk."""

    logits: torch.Tensor
    tails: list[tuple | None]  # per block: None (returns a tensor) or the tuple's tail
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)  # X_i for i >= 1


@contextlib.contextmanager
def _counting(layers: nn.ModuleList) -> Iterator[list[int]]:
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
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off while scoring; every module's own training flag is put back afterwards."""
    flags = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in flags.items():
            module.training = training


def _forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    device = model.get_input_embeddings().weight.device
    out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
    return out.logits


def _capture(
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
            hidden = args[0] if args else kwargs["hidden_states"]
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
        logits = _forward(model, input_ids, attention_mask)
    finally:
        for handle in handles:
            handle.remove()
    if store is not None and store.type == "cpu" and torch.cuda.is_available():
        inputs = {pos: x.pin_memory() for pos, x in inputs.items()}  # faster copies back to the GPU
    return _Capture(logits, tails, inputs)


# ---------------------------------------------------------------- the two methods


def _candidate_naive(model, anatomy: Anatomy, cap: _Capture, i: int, ids, mask) -> torch.Tensor:
    with _swapped(anatomy, {i: _StandIn(cap.tails[i], block=anatomy.layers[i])}):
        return _forward(model, ids, mask)


def _candidate_fast(model, anatomy: Anatomy, cap: _Capture, i: int, ids, mask) -> torch.Tensor:
    # Blocks before i are skipped for free (their output is never read: block i ignores its input)
    # and block i hands out X_i, the state after blocks 0..i-1. For i = 0, X_0 is the embeddings.
    layers = anatomy.layers
    stand_ins = {p: _StandIn(cap.tails[p], block=layers[p]) for p in range(i)}
    stand_ins[i] = _StandIn(cap.tails[i], cap.inputs.get(i), block=layers[i])
    with _swapped(anatomy, stand_ins):
        return _forward(model, ids, mask)


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
    with torch.no_grad(), _eval_mode(model), _counting(layers) as calls:
        for ids, mask in calibration.batches(chunk):
            before = calls[0]
            cap = _capture(model, layers, ids, mask, keep_inputs=method == "fast", store=store)
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

# (dropped positions before q, q): the hidden state entering block q depends on nothing else.
_Key = tuple[frozenset, int]


class DropSetLosses:
    """Mean next-token loss on `data` of the model with drop-sets of layer POSITIONS removed.

    The hidden state entering block q depends only on which blocks before q are dropped. So every pass
    keeps the states it computes, keyed by (dropped positions before q, q), and a drop-set resumes from
    the deepest state it shares with any pass run before: the intact pass serves every drop-set up to its
    first dropped block; a search candidate (its parent plus layer j) resumes from the parent's state
    entering j; and a candidate of the next step that differs from an earlier candidate only after j* (the
    layer removed meanwhile) resumes from that candidate's state entering j*.

    States of the intact pass and of the drop-sets passed to `ensure_chain` (a search's current best) are
    always kept; other states are kept while they fit in `cache_bytes` (default: a quarter of the free
    memory where they live) and until `retain` says no search descendant can use them. Each state holds
    every validation sample: (number of states) x samples x seq_len x hidden x bytes per element.
    Samples run in passes of `batch_size` (default: as many as keep a pass's logits within LOGITS_BYTES).

    block_forwards counts the block forward calls actually run, naive_block_forwards what running every
    evaluated drop-set from the embeddings would have cost (the intact pass included in both).
    """

    def __init__(self, model: nn.Module, data, *, batch_size: int | None = None, cache_bytes: int | None = None
                 ) -> None:
        self.model = model
        self.anatomy = get_anatomy(model)
        self.n = len(self.anatomy.layers)
        self.batches = list(data.batches(batch_size or _logits_batch(model, data.seq_len)))
        self.block_forwards = self.naive_block_forwards = 0
        self._states: dict[_Key, list[torch.Tensor]] = {}  # one tensor per batch
        self._pinned: set[_Key] = set()
        self._losses: dict[frozenset, float] = {}
        self._tails: list[list[tuple | None]] = []
        self.tokens = 0
        self.intact_loss = self._intact_pass()
        self.state_bytes = sum(x.numel() * x.element_size() for x in self._states[(frozenset(), 1)]) if self.n > 1 \
            else 0
        self.cache_bytes = _free_bytes(model) // 4 if cache_bytes is None else cache_bytes

    # ------------------------------------------------------------ public
    def loss(self, drop) -> float:
        """Mean next-token loss (nats) with the blocks at positions `drop` removed (memoized)."""
        drop = frozenset(drop)
        if drop not in self._losses:
            if not drop or min(drop) < 0 or max(drop) >= self.n or len(drop) >= self.n:
                raise LayerpruneError(f"a drop-set must remove 1 to {self.n - 1} of positions 0..{self.n - 1}, "
                                      f"got {sorted(drop)}")
            self._losses[drop] = self._run(drop)
            self.naive_block_forwards += (self.n - len(drop)) * len(self.batches)
        return self._losses[drop]

    def ensure_chain(self, drop) -> None:
        """Keep (computing what is missing) the states entering every block `drop` keeps, so that each
        drop-set `drop` + {j} resumes at j."""
        drop = frozenset(drop)
        chain = [(self._prefix(drop, q), q) for q in range(1, self.n) if q not in drop]
        missing = [key for key in chain if key not in self._states]
        if missing:
            self._losses[drop] = self._run(drop, limit=missing[0][1], pin=True)
        self._pinned.update(chain)

    def retain(self, parents) -> None:
        """Forget states that no superset of one of `parents` can resume from (the next search steps only
        try supersets); the intact pass and pinned chains of `parents` stay."""
        parents = [frozenset(p) for p in parents]
        self._pinned = {key for key in self._pinned if not key[0]
                        or any(key[0] == self._prefix(p, key[1]) for p in parents)}
        for key in list(self._states):
            if key not in self._pinned and not any(self._prefix(p, key[1]) <= key[0] for p in parents):
                del self._states[key]

    @property
    def cached_bytes(self) -> int:
        return len(self._states) * self.state_bytes

    # ------------------------------------------------------------ passes
    @staticmethod
    def _prefix(drop: frozenset, q: int) -> frozenset:
        return frozenset(p for p in drop if p < q)

    def _intact_pass(self) -> float:
        layers = self.anatomy.layers
        nll = 0.0
        with torch.no_grad(), _eval_mode(self.model), _counting(layers) as calls:
            for b, (ids, mask) in enumerate(self.batches):
                cap = _capture(self.model, layers, ids, mask, keep_inputs=True, store=None)
                value, count = token_nll(cap.logits, ids, mask)
                nll, self.tokens = nll + value, self.tokens + count
                self._tails.append(cap.tails)
                for q, state in cap.inputs.items():
                    self._states.setdefault((frozenset(), q), []).append(state)
        if self.tokens == 0:
            raise LayerpruneError("validation data has no predicted tokens")
        self._pinned.update(self._states)
        self.block_forwards += calls[0]
        self.naive_block_forwards += calls[0]
        return nll / self.tokens

    def _resume_point(self, drop: frozenset, limit: int) -> int:
        """The deepest block q <= limit whose entering state for `drop` is cached (0: the embeddings)."""
        for q in range(min(limit, self.n - 1), 0, -1):
            if (self._prefix(drop, q), q) in self._states:
                return q
        return 0

    def _run(self, drop: frozenset, *, limit: int | None = None, pin: bool = False) -> float:
        """One pass with `drop` removed, resumed as deep as the cache allows (at most at block `limit`);
        keeps the states entering the blocks it runs (all when pin, else what the budget allows)."""
        layers = self.anatomy.layers
        start = self._resume_point(drop, self.n if limit is None else limit)
        ahead = [q for q in range(start + 1, self.n)
                 if q not in drop and (self._prefix(drop, q), q) not in self._states]
        if not pin:
            room = max(0, self.cache_bytes - self.cached_bytes) // max(self.state_bytes, 1)
            ahead = ahead[:room]
        keep = {q: (self._prefix(drop, q), q) for q in ahead}
        new: dict[_Key, list[torch.Tensor]] = {key: [] for key in keep.values()}
        nll = 0.0
        with torch.no_grad(), _eval_mode(self.model), _counting(layers) as calls:
            for b, (ids, mask) in enumerate(self.batches):
                tails = self._tails[b]
                stand_ins = {p: _StandIn(tails[p], block=layers[p]) for p in [*range(start), *drop]}
                if start > 0:  # block start-1 hands out the cached state entering block start
                    cached = self._states[(self._prefix(drop, start), start)][b]
                    stand_ins[start - 1] = _StandIn(tails[start - 1], cached, block=layers[start - 1])
                handles = [layers[q].register_forward_pre_hook(_keep_input(new[key]), with_kwargs=True)
                           for q, key in keep.items()]
                try:
                    with _swapped(self.anatomy, stand_ins):
                        nll += token_nll(_forward(self.model, ids, mask), ids, mask)[0]
                finally:
                    for handle in handles:
                        handle.remove()
        self._states.update(new)
        if pin:
            self._pinned.update(new)
        self.block_forwards += calls[0]
        return nll / self.tokens


# Samples per pass when not given: as many as keep one pass's logits within this (the head is a large share
# of each candidate's time, and fewer, larger passes run it faster).
LOGITS_BYTES = 512 * 1024**2


def _logits_batch(model: nn.Module, seq_len: int) -> int:
    weight = model.get_input_embeddings().weight
    vocab = getattr(model.config.get_text_config(), "vocab_size", None) or weight.shape[0]
    return max(1, LOGITS_BYTES // (seq_len * vocab * weight.element_size()))


def _keep_input(states: list[torch.Tensor]):
    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        states.append(hidden.detach().clone())  # a copy: a block could modify its input in place

    return hook


def _free_bytes(model: nn.Module) -> int:
    """Free memory where the model's activations live: the CUDA device's, else the host's available memory."""
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 2 * 1024**3


def drop_set_losses(model: nn.Module, calibration, drop_sets: dict[str, list[int]], batch_size: int = 4) -> tuple[
        dict[str, float], int]:
    """Mean next-token loss of the model with each drop-set of layer POSITIONS removed, and the number of
    block forwards run. One intact pass caches every block's input; a candidate whose first dropped block
    is f then resumes from X_f, so blocks before f are never run again."""
    losses = DropSetLosses(model, calibration, batch_size=batch_size, cache_bytes=0)
    return {name: losses.loss(drop) for name, drop in drop_sets.items()}, losses.block_forwards
