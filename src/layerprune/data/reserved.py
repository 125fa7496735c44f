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
- The bundled task items that `eval --tasks` scores (ARC-e/c, PIQA, HellaSwag, OpenBookQA, MMLU, CMMLU,
  WinoGrande; data/task_data.py): each item's prompt (question, goal, context, sentence) when it is long and
  specific enough to be a copy (MIN_LINE_CHARS, and not one of the generic questions that recur across items,
  such as MMLU's "which of the following is true?"), and the prompt joined with each of its choices (the way
  a copy turned into training text or instruction records reads: question + answer, context + ending, a
  WinoGrande sentence with its blank filled).

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
from layerprune.data.task_data import BUNDLED_TASKS, read_task_rows

MIN_LINE_CHARS = 40
LINE_CORPORA = {"wikitext2": "the WikiText-2 test set", "ptb": "the Penn Treebank test set"}
C4_HELDOUT = "the reserved C4 slice (c4-heldout)"
DOLLY_HELDOUT = "the 500 reserved Dolly prompts (dolly-heldout)"
GENERIC_PROMPT_CHARS = 80  # a prompt shorter than this that recurs in several items is generic, not a copy


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


def task_items(name: str) -> list[tuple[str, list[str]]]:
    """(prompt, choices) of every item of a bundled task, as its file holds them."""
    rows = read_task_rows(BUNDLED_TASKS[name].data_file)
    if name == "piqa":
        return [(r["goal"], [r["sol1"], r["sol2"]]) for r in rows]
    if name == "hellaswag":
        return [(r["ctx"], list(r["endings"])) for r in rows]
    if name == "winogrande":  # the blank filled by each option is the sentence a copy would hold
        return [(r["sentence"], [r["option1"], r["option2"]]) for r in rows]
    key = "question_stem" if name == "openbookqa" else "question"
    return [(r[key], list(r["choices"]["text"] if isinstance(r["choices"], dict) else r["choices"])) for r in rows]


@lru_cache(maxsize=1)
def reserved_task_items() -> dict[bytes, str]:
    """fingerprint -> task, for the specific prompts of every bundled task item and each prompt joined with each
    of its choices."""
    table: dict[bytes, str] = {}
    for name, task in BUNDLED_TASKS.items():
        label = f"the {task.title} evaluation items ({name})"
        items = task_items(name)
        repeats: dict[str, int] = {}
        for prompt, _ in items:
            repeats[normalise(prompt)] = repeats.get(normalise(prompt), 0) + 1
        for prompt, choices in items:
            text = normalise(prompt)
            if len(text) >= MIN_LINE_CHARS and (repeats[text] == 1 or len(text) >= GENERIC_PROMPT_CHARS):
                table[fingerprint(text)] = label
            for choice in choices:
                table[fingerprint(f"{prompt} {choice}")] = label
                if name == "winogrande":
                    table[fingerprint(prompt.replace("_", choice, 1))] = label
    return table


def reserved_text_hits(texts: list[str]) -> dict[str, int]:
    """{test set: how many of its lines or documents the texts hold}; empty when they hold none."""
    lines, documents, items = reserved_lines(), reserved_documents(), reserved_task_items()
    hits: dict[str, int] = {}
    for text in texts:
        if fingerprint(text) in documents:
            hits[C4_HELDOUT] = hits.get(C4_HELDOUT, 0) + 1
            continue
        if label := items.get(fingerprint(text)):  # a document that is one item (its prompt and an answer)
            hits[label] = hits.get(label, 0) + 1
            continue
        for line in text.splitlines():
            if len(line) >= MIN_LINE_CHARS and (label := lines.get(fingerprint(line)) or items.get(fingerprint(line))):
                hits[label] = hits.get(label, 0) + 1
    return hits


def reserved_example(example: Example) -> str | None:
    """The evaluation data an instruction example comes from (a reserved Dolly prompt, a bundled task item:
    its prompt as instruction or context, or with one of its choices as the response), or None."""
    if _prompt_fingerprint(example.instruction, example.context) in reserved_prompts():
        return DOLLY_HELDOUT
    items = reserved_task_items()
    parts = (example.instruction, example.context, f"{example.instruction} {example.context}",
             f"{example.instruction} {example.response}", f"{example.instruction} {example.context} {example.response}",
             f"{example.context} {example.response}")
    return next((items[f] for f in map(fingerprint, parts) if f in items), None)


@lru_cache(maxsize=1)
def reserved_task_rows() -> dict[bytes, str]:
    """fingerprint of a row's canonical JSON -> task, for every row of the bundled task files: a copy of a file
    is recognised record by record, its short questions included, whatever fields training reads."""
    return {_row_fingerprint(row): f"the {task.title} evaluation items ({name})"
            for name, task in BUNDLED_TASKS.items() for row in read_task_rows(task.data_file)}


def _row_fingerprint(row: dict) -> bytes:
    return hashlib.blake2b(json.dumps(row, sort_keys=True, ensure_ascii=False).encode("utf-8"), digest_size=8).digest()


def without_reserved_prompts(examples: list[Example], records: list[dict] | None = None
                             ) -> tuple[list[Example], dict[str, int]]:
    """(the examples that are not reserved evaluation data, {evaluation data: how many records were dropped}).
    records: the JSON record of each example, when it was read from one (a row of a bundled task file)."""
    rows = reserved_task_rows() if records is not None else {}
    kept, dropped = [], {}
    for number, example in enumerate(examples):
        label = rows.get(_row_fingerprint(records[number])) if records is not None else None
        label = label or reserved_example(example)
        if label is None:
            kept.append(example)
        else:
            dropped[label] = dropped.get(label, 0) + 1
    return kept, dropped
