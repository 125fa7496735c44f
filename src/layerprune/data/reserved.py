"""Reserved evaluation data recognised by its content, not its name.

`--data wikitext2` is refused as training data; a path to a copy of the same file (gzip or not, whole or in
part) must be too, or every later "held-out" number is measured on text the model was trained on. Each
reserved corpus is reduced once per process to fingerprints (8-byte BLAKE2b digests of normalised text):

- WikiText-2 and PTB test sets: their lines of at least MIN_LINE_CHARS characters (paragraphs, sentences).
  A line that long and equal after normalisation is a copy, not a coincidence; headings and short lines,
  which other texts may share, are not counted.
- The reserved C4 slice (`c4-heldout`): its whole documents, since short web boilerplate lines also occur in
  the training slice and elsewhere.
- The reserved Dolly prompts (`dolly-heldout`): instruction and context, as `dolly_split` reserves them.

Text holding reserved lines or documents is refused; an instruction file's reserved records are dropped and
the training record counts them (a downloaded databricks-dolly-15k holds them among 14,500 others).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from functools import lru_cache

from layerprune.data.instructions import Example, dolly_records, dolly_split
from layerprune.data.sources import BUNDLED_CORPORA, bundled_path, read_bundled_lines

MIN_LINE_CHARS = 40
LINE_CORPORA = {"wikitext2": "the WikiText-2 test set", "ptb": "the Penn Treebank test set"}
C4_HELDOUT = "the reserved C4 slice (c4-heldout)"


def normalise(text: str) -> str:
    """Whitespace collapsed and case folded: a copy re-wrapped, re-spaced or lower-cased is still a copy."""
    return " ".join(text.split()).casefold()


def fingerprint(text: str) -> bytes:
    return hashlib.blake2b(normalise(text).encode("utf-8"), digest_size=8).digest()


@lru_cache(maxsize=1)
def reserved_lines() -> dict[bytes, str]:
    """fingerprint -> test set, for every long line of the bundled WikiText-2 and PTB test sets."""
    table: dict[bytes, str] = {}
    for name, label in LINE_CORPORA.items():
        for line in read_bundled_lines(name):
            if len(normalise(line)) >= MIN_LINE_CHARS:
                table[fingerprint(line)] = label
    return table


@lru_cache(maxsize=1)
def reserved_documents() -> frozenset[bytes]:
    """Fingerprints of the documents of the reserved C4 slice."""
    corpus = BUNDLED_CORPORA["c4-heldout"]
    with gzip.open(bundled_path(corpus.filename), "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return frozenset(fingerprint(text) for text in texts[slice(*corpus.documents)])


@lru_cache(maxsize=1)
def reserved_prompts() -> frozenset[bytes]:
    """Fingerprints of the reserved Dolly prompts (instruction and context)."""
    _, reserved = dolly_split(dolly_records())
    return frozenset(_prompt_fingerprint(r["instruction"], r.get("context", "") or "") for r in reserved)


def _prompt_fingerprint(instruction: str, context: str) -> bytes:
    return fingerprint(f"{instruction}\x00{context}")


def reserved_text_hits(texts: list[str]) -> dict[str, int]:
    """{test set: how many of its lines or documents the texts hold}; empty when they hold none."""
    lines, documents = reserved_lines(), reserved_documents()
    hits: dict[str, int] = {}
    for text in texts:
        if fingerprint(text) in documents:
            hits[C4_HELDOUT] = hits.get(C4_HELDOUT, 0) + 1
            continue
        for line in text.splitlines():
            if len(line) >= MIN_LINE_CHARS and (label := lines.get(fingerprint(line))):
                hits[label] = hits.get(label, 0) + 1
    return hits


def without_reserved_prompts(examples: list[Example]) -> tuple[list[Example], int]:
    """(the examples whose prompt is not a reserved Dolly prompt, how many were dropped)."""
    prompts = reserved_prompts()
    kept = [e for e in examples if _prompt_fingerprint(e.instruction, e.context) not in prompts]
    return kept, len(examples) - len(kept)
