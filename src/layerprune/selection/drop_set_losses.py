"""The validation-loss engine of select auto, the drop-set search and the trade-off curve: the mean next-token
loss (or KL to the unpruned model) of the model with drop-sets of layers removed, computed by resuming from
cached hidden states."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.importance.perplexity import (
    capture_pass,
    counting_calls,
    eval_mode,
    forward_logits,
    predicted_positions,
    token_nll,
)
from layerprune.models.anatomy import get_anatomy
from layerprune.models.bypass import StandIn, swapped
from layerprune.models.decoder_calls import layer_input

# (dropped positions before q, q): the hidden state entering block q depends on nothing else.
_Key = tuple[frozenset, int]

# What a pass measures per predicted token: nll (the next-token cross-entropy) | kl (KL(p_unpruned || p_pruned)
# of the next-token distributions over the whole vocabulary).
MEASURES = ("nll", "kl")


class DropSetLosses:
    """Mean next-token loss on `data` of the model with drop-sets of layer POSITIONS removed.

    measure "nll" (default): the cross-entropy of the tokens `data` scores (every real token after the
    first, or its `scored` tokens), in nats. measure "kl": the mean over the same tokens of
    KL(p_unpruned || p_pruned) of the next-token distributions, exact over the whole vocabulary, in nats; the
    unpruned model's value is 0. For it the intact pass keeps its log-probabilities at every predicted token
    as float32 where the logits live (the model's device): tokens x vocab x 4 bytes (10 x 128 tokens of a
    49,152-token vocabulary: 252 MB; of a 128,256-token one: 657 MB). They exist before the free memory that
    sizes `cache_bytes` is measured, so the states' budget leaves room for them.

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

    def __init__(self, model: nn.Module, data, *, batch_size: int | None = None, cache_bytes: int | None = None,
                 measure: str = "nll") -> None:
        if measure not in MEASURES:
            raise LayerpruneError(f"unknown drop-set measure {measure!r}; choose {' or '.join(MEASURES)}")
        self.model = model
        self.measure = measure
        self.anatomy = get_anatomy(model)
        self.n = len(self.anatomy.layers)
        self.batches = list(data.scored_batches(batch_size or _logits_batch(model, data.seq_len)))
        self._reference: list[list[torch.Tensor]] = []  # kl: the intact log-probabilities, per batch and sample
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
        with torch.no_grad(), eval_mode(self.model), counting_calls(layers) as calls:
            for b, (ids, mask, scored) in enumerate(self.batches):
                cap = capture_pass(self.model, layers, ids, mask, keep_inputs=True, store=None)
                value, count = token_nll(cap.logits, ids, mask, scored)
                nll, self.tokens = nll + value, self.tokens + count
                if self.measure == "kl":
                    self._reference.append(next_token_logprobs(cap.logits, mask, scored))
                self._tails.append(cap.tails)
                for q, state in cap.inputs.items():
                    self._states.setdefault((frozenset(), q), []).append(state)
        if self.tokens == 0:
            raise LayerpruneError("validation data has no predicted tokens")
        self._pinned.update(self._states)
        self.block_forwards += calls[0]
        self.naive_block_forwards += calls[0]
        return 0.0 if self.measure == "kl" else nll / self.tokens

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
        with torch.no_grad(), eval_mode(self.model), counting_calls(layers) as calls:
            for b, (ids, mask, scored) in enumerate(self.batches):
                tails = self._tails[b]
                stand_ins = {p: StandIn(tails[p], block=layers[p]) for p in [*range(start), *drop]}
                if start > 0:  # block start-1 hands out the cached state entering block start
                    cached = self._states[(self._prefix(drop, start), start)][b]
                    stand_ins[start - 1] = StandIn(tails[start - 1], cached, block=layers[start - 1])
                handles = [layers[q].register_forward_pre_hook(_keep_input(new[key]), with_kwargs=True)
                           for q, key in keep.items()]
                try:
                    with swapped(self.anatomy, stand_ins):
                        nll += self._measured(forward_logits(self.model, ids, mask), b)
                finally:
                    for handle in handles:
                        handle.remove()
        self._states.update(new)
        if pin:
            self._pinned.update(new)
        self.block_forwards += calls[0]
        return nll / self.tokens

    def _measured(self, logits: torch.Tensor, b: int) -> float:
        """The sum over batch b's predicted tokens of the measure, from the pruned model's logits."""
        ids, mask, scored = self.batches[b]
        if self.measure == "kl":
            return token_kl(self._reference[b], logits, mask, scored)
        return token_nll(logits, ids, mask, scored)[0]


def next_token_logprobs(logits: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor | None = None
                        ) -> list[torch.Tensor]:
    """Per sample, the float32 log-probabilities [predicted tokens, vocab] at its predicted positions."""
    valid = predicted_positions(attention_mask, scored, logits.device)
    return [F.log_softmax(logits[b, :-1][valid[b]].float(), dim=-1) for b in range(logits.shape[0])]


def token_kl(reference: list[torch.Tensor], logits: torch.Tensor, attention_mask: torch.Tensor,
             scored: torch.Tensor | None = None) -> float:
    """Sum over the predicted tokens of KL(reference || softmax(logits)) in nats; `reference` is
    next_token_logprobs of the unpruned model on the same batch. One sample at a time, like token_nll."""
    valid = predicted_positions(attention_mask, scored, logits.device)
    total = 0.0
    for b, target in enumerate(reference):
        if target.shape[0]:
            pruned = F.log_softmax(logits[b, :-1][valid[b]].float(), dim=-1)
            total += float(F.kl_div(pruned, target, log_target=True, reduction="sum"))
    return total


# Samples per pass when not given: as many as keep one pass's logits within this (the head is a large share
# of each candidate's time, and fewer, larger passes run it faster).
LOGITS_BYTES = 512 * 1024**2


def _logits_batch(model: nn.Module, seq_len: int) -> int:
    weight = model.get_input_embeddings().weight
    vocab = getattr(model.config.get_text_config(), "vocab_size", None) or weight.shape[0]
    return max(1, LOGITS_BYTES // (seq_len * vocab * weight.element_size()))


def _keep_input(states: list[torch.Tensor]):
    def hook(module, args, kwargs):
        hidden = layer_input(args, kwargs)
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


def drop_set_losses(model: nn.Module, calibration, drop_sets: dict[str, list[int]], batch_size: int = 4,
                    measure: str = "nll") -> tuple[dict[str, float], int]:
    """Mean next-token loss (or KL: `measure`) of the model with each drop-set of layer POSITIONS removed, and
    the number of block forwards run. One intact pass caches every block's input; a candidate whose first
    dropped block is f then resumes from X_f, so blocks before f are never run again."""
    losses = DropSetLosses(model, calibration, batch_size=batch_size, cache_bytes=0, measure=measure)
    return {name: losses.loss(drop) for name, drop in drop_sets.items()}, losses.block_forwards
