"""Calibration data: a few token sequences that importance metrics push through the model.

Sources: a bundled corpus by name (default `c4`, a C4 validation sample), a text
file (one document per blank-line-separated block), a JSONL file with a text field,
or a hub dataset id (users with a hub). The paper's default is 10 samples x 128 tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Iterator

import torch

from layerprune.data.sources import read_texts
from layerprune.errors import LayerpruneError
from layerprune.models.tokens import pad_token_id


@dataclass
class CalibrationData:
    """input_ids [N, L]; attention_mask [N, L] with 1 for real tokens and 0 for padding.

    scored [N, L] (optional): 1 on the tokens whose prediction counts (a multiple-choice answer after its
    question); None: every real token after the first. Only losses that read `scored_batches` use it."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    description: dict = field(default_factory=dict)
    scored: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.input_ids.ndim != 2 or self.input_ids.shape != self.attention_mask.shape:
            raise ValueError("input_ids and attention_mask must both be [num_samples, seq_len]")
        if self.scored is not None and self.scored.shape != self.input_ids.shape:
            raise ValueError("scored must be [num_samples, seq_len], like input_ids")
        if self.input_ids.shape[0] == 0 or int(self.attention_mask.sum()) == 0:
            raise LayerpruneError("calibration data is empty")

    @property
    def num_samples(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def batches(self, batch_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for start in range(0, self.num_samples, batch_size):
            yield self.input_ids[start : start + batch_size], self.attention_mask[start : start + batch_size]

    def scored_batches(self, batch_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(input_ids, attention_mask, scored or None) per batch. With `scored` (rows of unequal length, right
        padded), a batch drops the padding columns none of its rows reach: a causal model's earlier positions
        do not see later ones, so only the work changes."""
        for start in range(0, self.num_samples, batch_size):
            rows = slice(start, start + batch_size)
            ids, mask = self.input_ids[rows], self.attention_mask[rows]
            if self.scored is None:
                yield ids, mask, None
                continue
            width = int(mask.sum(dim=0).nonzero().max()) + 1 if bool(mask.any()) else 1
            yield ids[:, :width], mask[:, :width], self.scored[rows, :width]

    def nonempty_batches(self, batch_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Like batches(), without all-padding rows (they have no token to measure); empty batches are skipped."""
        for ids, mask in self.batches(batch_size):
            keep = mask.sum(dim=1) > 0
            if bool(keep.any()):
                yield ids[keep], mask[keep]


def _bos_prefix(tokenizer) -> list[int]:
    """[bos] when the tokenizer itself adds BOS to an encoded text (it follows the tokenizer)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    probe = tokenizer("hello").input_ids
    return [bos] if probe and probe[0] == bos else []


def calibration_from_texts(
    tokenizer,
    texts: list[str],
    *,
    n_samples: int = 10,
    seq_len: int = 128,
    seed: int = 0,
    mode: str = "concat",
    source: str = "texts",
) -> CalibrationData:
    """Build N samples of L tokens from documents.

    mode "concat" (default): documents are shuffled with the seed, joined, and cut into
    N non-overlapping full windows (no padding). mode "document": one sample per
    shuffled document, truncated to L and right-padded (attention_mask marks padding).
    """
    if n_samples < 1 or seq_len < 2:
        raise LayerpruneError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    docs = [t for t in texts if t and t.strip()]
    if not docs:
        raise LayerpruneError(f"calibration source {source!r} has no text")
    random.Random(seed).shuffle(docs)
    prefix = _bos_prefix(tokenizer)
    body_len = seq_len - len(prefix)
    rows: list[list[int]] = []
    if mode == "concat":
        separator = tokenizer.eos_token_id
        stream: list[int] = []
        for doc in docs:
            stream.extend(tokenizer(doc, add_special_tokens=False).input_ids)
            if separator is not None:
                stream.append(separator)
            if len(stream) >= n_samples * body_len:
                break
        if len(stream) < n_samples * body_len:
            raise LayerpruneError(
                f"calibration source {source!r} is too short: {len(stream)} tokens, "
                f"{n_samples} x {seq_len} needed"
            )
        rows = [prefix + stream[i * body_len : (i + 1) * body_len] for i in range(n_samples)]
    elif mode == "document":
        for doc in docs[:n_samples]:
            rows.append(prefix + tokenizer(doc, add_special_tokens=False).input_ids[:body_len])
        if len(rows) < n_samples:
            raise LayerpruneError(f"calibration source {source!r} has {len(rows)} documents, {n_samples} needed")
    else:
        raise LayerpruneError(f"unknown calibration mode {mode!r}; use concat or document")
    ids = torch.full((len(rows), seq_len), pad_token_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[r, : len(row)] = 1
    description = {
        "source": source,
        "n_samples": n_samples,
        "seq_len": seq_len,
        "seed": seed,
        "mode": mode,
        "bos": bool(prefix),
        "tokens": int(mask.sum()),
    }
    return CalibrationData(ids, mask, description)


def load_calibration(
    tokenizer,
    source: str = "c4",
    *,
    n_samples: int = 10,
    seq_len: int = 128,
    seed: int = 0,
    mode: str = "concat",
    field: str = "text",
) -> CalibrationData:
    """Calibration data from a bundled corpus name, a .txt/.jsonl path, or a hub dataset id."""
    texts = read_texts(source, field=field)
    return calibration_from_texts(
        tokenizer, texts, n_samples=n_samples, seq_len=seq_len, seed=seed, mode=mode, source=source
    )


# select auto and search judge drop-sets on calibration text drawn with this seed offset, so the text that
# ranks layers is never the text that judges drop-sets.
VALIDATION_SEED_OFFSET = 1000


def load_calibration_for(loaded, config, *, validation: bool = False) -> CalibrationData:
    """The calibration text of `config`, encoded with the model's tokenizer; validation=True draws the
    held-out text that select auto judges candidates on (another seed, so other documents)."""
    if loaded.tokenizer is None:
        raise LayerpruneError(f"{loaded.ref} has no tokenizer, so calibration text cannot be encoded")
    seed = config.seed + (VALIDATION_SEED_OFFSET if validation else 0)
    return load_calibration(loaded.tokenizer, config.source, n_samples=config.n_samples, seq_len=config.seq_len,
                            seed=seed, field=config.field)
