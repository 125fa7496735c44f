"""Shared-prefix log-likelihood scoring for lm-eval: every distinct context runs through the model once.

lm-eval's HFLM scores each (context, continuation) pair as its own sequence (only one-token continuations
of one context share a forward), so a 4-choice question with longer answers pays for its context 4 times,
and it projects every position onto the vocabulary. Here the requests that see the
same context (after HFLM's own left truncation) become one token tree: the context, then each continuation
as a branch; distinct contexts that begin alike (a task's shared header, as in MMLU) can share one tree,
their common tokens once. Trees are packed into rows; a 4D attention mask lets each token see only its
ancestors and the position ids restart at every branch, so each branch computes exactly what its own
sequence would. Only the positions that predict a continuation token go through the LM head.

Prompts, tokenization (HFLM's `_encode_pair`), truncation, is-greedy flags and metrics stay lm-eval's: this
only changes how the numbers are computed (log-likelihoods agree to float rounding).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch

FULL, SLIDING = "full_attention", "sliding_attention"
CHUNK = 512  # trees sorted and packed together: more packs tighter, fewer keeps the early rate representative
MIN_SHARED = 8  # contexts that share at least this many leading tokens (a task's header) may share a tree


@dataclass
class Tree:
    """Contexts and every continuation scored after them: a token trie, parents before children.

    Usually one context; contexts that start alike (MMLU's subject header) can share one tree, the shared
    tokens run once. A node's hidden state depends only on its ancestors, so sharing changes no number."""

    tokens: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)  # each node's parent; -1 for the root
    positions: list[int] = field(default_factory=list)  # position id = depth
    # (request index, the nodes whose logits predict each continuation token, the continuation)
    scored: list[tuple[int, list[int], list[int]]] = field(default_factory=list)
    children: dict[tuple[int, int], int] = field(default_factory=dict, repr=False)
    contexts: int = 0

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def depth(self) -> int:
        return max(self.positions) + 1

    @property
    def is_chain(self) -> bool:
        """No branches (one continuation, or only one-token ones): plain causal attention is its mask."""
        return len(self.tokens) == self.depth

    def insert(self, context) -> int:
        """Walk or grow the path of `context` from the root; its last node (where continuations branch)."""
        self.contexts += 1
        return self._path(-1, context)[-1]

    def add(self, index: int, end: int, continuation: list[int]) -> None:
        """Branch `continuation` off the context ending at node `end`; continuations share common prefixes.
        The last token is only predicted, never fed (HFLM's inp[:-1])."""
        self.scored.append((index, [end] + self._path(end, continuation[:-1]), continuation))

    def _path(self, node: int, tokens) -> list[int]:
        nodes = []
        for token in tokens:
            child = self.children.get((node, token))
            if child is None:
                child = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self.positions.append(self.positions[node] + 1 if node >= 0 else 0)
                self.children[(node, token)] = child
            node = child
            nodes.append(node)
        return nodes

    def visible(self) -> np.ndarray:
        """[n, n] bool: node i sees node j when j is i or one of its ancestors."""
        n = len(self.tokens)
        chain = next((i for i in range(1, n) if self.parents[i] != i - 1), n)  # the leading run is causal
        seen = np.zeros((n, n), dtype=bool)
        seen[:chain, :chain] = np.tri(chain, dtype=bool)
        for i in range(chain, n):
            seen[i] = seen[self.parents[i]]
            seen[i, i] = True
        return seen


def build_trees(requests: list, max_length: int, share_tokens: int | None = None,
                min_shared: int = MIN_SHARED) -> list[Tree]:
    """Group `(key, context_tokens, continuation_tokens)` requests by the context each one really sees.

    HFLM feeds `(context + continuation)[-(max_length + 1):][:-1]`: a pair longer than the window loses
    tokens on the left, so its context is what is left before the continuation. With `share_tokens`,
    contexts whose first `min_shared` or more tokens agree share one tree of at most that many tokens.
    """
    groups: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for index, (_, context_enc, continuation_enc) in enumerate(requests):
        # HFLM's own checks, word for word: harness._request_error turns them into one-line errors
        assert len(context_enc) > 0
        assert len(continuation_enc) > 0
        assert len(continuation_enc) <= max_length
        kept = (list(context_enc) + list(continuation_enc))[-(max_length + 1):]
        key = tuple(kept[: len(kept) - len(continuation_enc)])
        groups.setdefault(key, []).append((index, list(continuation_enc)))
    trees: list[Tree] = []
    previous: tuple[int, ...] = ()
    # Sorted, a context shares the longest prefix of any earlier one with the one just before it.
    for key in sorted(groups) if share_tokens else groups:
        branches = groups[key]
        if share_tokens and trees and (shared := _common_prefix(previous, key)) >= min_shared:
            grown = len(key) - shared + sum(len(c) - 1 for _, c in branches)  # at most this many new nodes
            tree = trees[-1] if len(trees[-1]) + grown <= share_tokens else None
        else:
            tree = None
        if tree is None:
            tree = Tree()
            trees.append(tree)
        end = tree.insert(key)
        for index, continuation in branches:
            tree.add(index, end, continuation)
        previous = key
    return trees


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def pack_rows(trees: list[Tree], row_tokens: int) -> list[list[Tree]]:
    """Trees in order, packed into rows of at most `row_tokens` tokens (a longer tree gets a row alone)."""
    rows: list[list[Tree]] = []
    for tree in trees:
        if rows and sum(map(len, rows[-1])) + len(tree) <= row_tokens:
            rows[-1].append(tree)
        else:
            rows.append([tree])
    return rows


def batch_rows(rows: list[list[Tree]], token_budget: int) -> list[list[list[Tree]]]:
    """Consecutive rows, as many per forward as fit `token_budget` padded tokens (at least one)."""
    batches: list[list[list[Tree]]] = []
    longest = 0
    for row in rows:
        length = sum(map(len, row))
        if batches and max(longest, length) * (len(batches[-1]) + 1) <= token_budget:
            batches[-1].append(row)
            longest = max(longest, length)
        else:
            batches.append([row])
            longest = length
    return batches


def padded_tokens(rows: list[list[Tree]]) -> int:
    """What a batch costs: rows x the longest row."""
    return len(rows) * max(sum(map(len, row)) for row in rows)


@dataclass
class AttentionPlan:
    """How the model masks attention, from its config: which masks a packed batch must carry."""

    layer_types: tuple[str, ...]  # the distinct attention types of the layers
    window: int | None  # sliding window (keys with query position - key position < window are seen)
    per_type: bool  # the model takes {layer type: mask}; else one mask serves every layer


def attention_plan(model) -> AttentionPlan | None:
    """None when the tree mask cannot reproduce the model's attention (stock scoring is used instead)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or not getattr(config, "is_causal", True):
        return None
    if getattr(config, "use_bidirectional_attention", False):
        return None
    if getattr(config, "_attn_implementation", "eager") not in ("sdpa", "eager"):
        return None  # flash / flex kernels take no dense 4D mask
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        types = tuple(sorted(set(layer_types)))
        if set(types) - {FULL, SLIDING} or (SLIDING in types and not isinstance(window, int)):
            return None  # chunked / linear attention and other kinds are not modelled here
        return AttentionPlan(types, window if SLIDING in types else None, per_type=True)
    if isinstance(window, int):  # Mistral-style: every layer slides
        return AttentionPlan((SLIDING,), window, per_type=False)
    return AttentionPlan((FULL,), None, per_type=False)


def plan_batches(trees: list[Tree], row_tokens: int, rows_per_batch: int, chunk: int = CHUNK,
                 seed: int = 0) -> list[list[list[Tree]]]:
    """Batches of rows for the whole run, with little padding and an early part that looks like the rest.

    Trees go in a seeded random order, `chunk` at a time (so the first minute is a sample of the whole run
    and the ETA holds); within a chunk they are sorted longest first and packed into rows, so each batch
    holds rows of about the same length.
    """
    order = list(trees)
    random.Random(seed).shuffle(order)
    batches: list[list[list[Tree]]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=len, reverse=True)
        batches += batch_rows(pack_rows(part, row_tokens), rows_per_batch * row_tokens)
    return batches


@dataclass
class Batch:
    """Packed rows as model inputs, and where each scored node's logits land in the output."""

    input_ids: torch.Tensor  # [rows, length]
    position_ids: torch.Tensor  # [rows, length]
    attention_mask: torch.Tensor | dict[str, torch.Tensor]  # additive [rows, 1, length, length] (per layer type)
    keep: torch.Tensor  # [rows, length] bool: the positions whose logits are needed
    flat: np.ndarray  # [rows, length]: row of the kept logits for each kept position
    rows: list[list[Tree]]


def make_batch(rows: list[list[Tree]], plan: AttentionPlan, dtype: torch.dtype, device) -> Batch:
    """Rows side by side, right-padded; trees side by side in a row, each seeing only itself."""
    length = max(sum(map(len, row)) for row in rows)
    ids = np.zeros((len(rows), length), dtype=np.int64)
    positions = np.zeros((len(rows), length), dtype=np.int64)
    keep = np.zeros((len(rows), length), dtype=bool)
    # Rows of one unbranched tree each (e.g. rolling windows) take the model's own causal mask: a 2D padding
    # mask, no [length, length] tensor (which would be large for long windows).
    chains = all(len(row) == 1 and row[0].is_chain for row in rows)
    seen = None if chains else np.zeros((len(rows), length, length), dtype=bool)
    for r, row in enumerate(rows):
        start = 0
        for tree in row:
            end = start + len(tree)
            ids[r, start:end] = tree.tokens
            positions[r, start:end] = tree.positions
            if seen is not None:
                seen[r, start:end, start:end] = tree.visible()
            for _, nodes, _ in tree.scored:
                keep[r, [start + n for n in nodes]] = True
            start = end
        if seen is not None:
            seen[r, range(start, length), range(start, length)] = True  # padding sees itself: no empty softmax
    if seen is None:
        lengths = np.array([len(row[0]) for row in rows])
        mask = torch.from_numpy(np.arange(length)[None, :] < lengths[:, None]).long().to(device)
    elif plan.window is None or max(tree.depth for row in rows for tree in row) <= plan.window:
        mask = _additive(seen, dtype, device)  # every key is inside the window: one mask serves all layers
    else:
        near = positions[:, :, None] - positions[:, None, :] < plan.window
        sliding = _additive(seen & near, dtype, device)
        mask = {FULL: _additive(seen, dtype, device), SLIDING: sliding} if plan.per_type else sliding
    flat = np.cumsum(keep.ravel()).reshape(keep.shape) - 1
    return Batch(torch.from_numpy(ids).to(device), torch.from_numpy(positions).to(device), mask,
                 torch.from_numpy(keep).to(device), flat, rows)


def _additive(allowed: np.ndarray, dtype: torch.dtype, device) -> torch.Tensor:
    blocked = torch.from_numpy(~allowed).to(device)[:, None]
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill_(blocked, torch.finfo(dtype).min)


def forward_logprobs(model, batch: Batch, softmax_dtype: torch.dtype, logits_to_keep: bool) -> torch.Tensor:
    """[kept positions, vocab] log-probabilities; the LM head runs on the kept positions only."""
    kwargs = {"logits_to_keep": batch.keep} if logits_to_keep else {}
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   position_ids=batch.position_ids, use_cache=False, **kwargs).logits
    if logits.dim() == 3:  # every position was projected (no logits_to_keep): pick the kept ones
        logits = logits[batch.keep]
    return torch.log_softmax(logits, dim=-1, dtype=softmax_dtype)


def read_scores(batch: Batch, logprobs: torch.Tensor) -> list[tuple[int, float, bool]]:
    """(request index, summed log-likelihood, every continuation token is the argmax) per scored request."""
    greedy = logprobs.argmax(dim=-1).cpu().numpy()
    indices, rows, tokens, ends = [], [], [], []
    for r, row in enumerate(batch.rows):
        start = 0
        for tree in row:
            for index, nodes, continuation in tree.scored:
                indices.append(index)
                rows.extend(batch.flat[r, start + n] for n in nodes)
                tokens.extend(continuation)
                ends.append(len(rows))
            start += len(tree)
    rows_t = torch.tensor(rows, device=logprobs.device)
    values = logprobs[rows_t, torch.tensor(tokens, device=logprobs.device)].cpu()
    hits = greedy[rows] == np.asarray(tokens)
    out, begin = [], 0
    for index, end in zip(indices, ends):
        # summed in the softmax dtype, as HFLM does: a float64 sum would differ from it by fp32 rounding
        out.append((index, float(values[begin:end].sum()), bool(hits[begin:end].all())))
        begin = end
    return out
