"""Training rows of a healing config: general text as blocks, instruction data as prompt + response, mixes
interleaved in proportion; the bundled evaluation texts are refused.

Healing (finetune/) supplies what only it knows: whether its method reads raw text, its default data, and,
with `responses: teacher`, a function that has the teacher answer the instruction examples the steps read.
"""

from __future__ import annotations

import random
from typing import Callable

from layerprune.data.instructions import Example, pack, read_records, records_as_examples, tokenize_examples, tokenize_text
from layerprune.data.mixes import interleave, is_mix, parse_mix
from layerprune.data.reserved import reserved_text_hits, without_reserved_prompts
from layerprune.data.sources import BUNDLED_CORPORA, read_texts
from layerprune.errors import LayerpruneError

# (examples the steps may read, the share of the rows this source gives) -> the examples with new responses
Answer = Callable[[list[Example], float], list[Example]]


# Bundled texts that are evaluation test sets (see resources/data/MANIFEST.md): never training data.
EVALUATION_ONLY_TEXTS = ("wikitext2", "ptb", "c4-heldout", "dolly-heldout")


def training_rows(config, tokenizer, *, default_data: str, raw_text: bool, answer: Answer | None = None
                          ) -> tuple[list[dict], dict]:
    """Tokenized training rows of a healing config and a description of the data.

    General text (a bundled corpus such as c4, a .txt file; every source of a raw-text method) becomes
    blocks of max_length tokens with the loss on every token; instruction data (dolly, .json/.jsonl, hub
    ids) becomes prompt + response with the loss on the response, in a seeded random order. A mix
    (`c4:3+dolly:1`, data/mixes.py) tokenizes each source as its kind and interleaves them in proportion.
    config: a HealConfig (data, max_length, max_samples, seed, template, packing, field_map()); default_data
    and raw_text: what the healing method reads; answer: the teacher answering the instruction examples
    (`responses: teacher`, finetune/teacher_responses.py), None to train on the data's own responses."""
    if tokenizer is None:
        raise LayerpruneError("healing needs the model's tokenizer")
    source = config.data or default_data
    if not is_mix(source):
        rows, info = _source_rows(source, config, tokenizer, raw_text=raw_text, answer=answer)
        if answer and info["kind"] != "instructions":
            raise LayerpruneError(f"responses: teacher answers instruction prompts, and {source} is general text; "
                                  "use instruction data (dolly, a .jsonl file) or a mix such as c4:3+dolly:1")
        return rows, info
    parts = parse_mix(source)
    total = sum(weight for _, weight in parts)
    prepared = [_source_rows(name, config.model_copy(update={"max_samples": None}), tokenizer, raw_text=False,
                             answer=answer, share=weight / total) for name, weight in parts]
    if answer and not any(info["kind"] == "instructions" for _, info in prepared):
        raise LayerpruneError(f"responses: teacher answers instruction prompts, and the mix {source} has none")
    rows, taken = interleave([rows for rows, _ in prepared], [weight for _, weight in parts], limit=config.max_samples)
    return rows, {"source": source, "kind": "mix", "rows": len(rows),
                  "parts": [{**info, "weight": weight, "rows_used": used}
                            for (_, info), (_, weight), used in zip(prepared, parts, taken)]}


def _source_rows(source: str, config, tokenizer, *, raw_text: bool, answer: Answer | None = None, share: float = 1.0):
    """(rows, info) of one training source, tokenized as its kind; instruction examples in a seeded random
    order (the bundled Dolly is sorted by category, and training reads the first rows). answer: gives the
    examples the teacher's responses (`share` of the rows, for a mix's source)."""
    if source in EVALUATION_ONLY_TEXTS:
        raise LayerpruneError(
            f"the bundled {source} is TEST data that `layerprune eval` measures on; training on it would make "
            "that measure meaningless. Use c4 or dolly (bundled) or data of your own")
    if raw_text or source in BUNDLED_CORPORA or source.endswith((".txt", ".txt.gz")):
        rows = tokenize_text(_training_texts(source), tokenizer, max_length=config.max_length,
                             max_samples=config.max_samples)
        return rows, {"source": source, "kind": "raw text", "blocks": len(rows), "block_tokens": config.max_length}
    examples, dropped = _training_examples(source, config)
    responses = "data"
    if answer is not None:
        examples = answer(examples, share)
        responses = f"the teacher's (greedy, at most {config.response_tokens} tokens)"
    rows = tokenize_examples(examples, tokenizer, template=config.template, max_length=config.max_length)
    if config.packing:
        rows = pack(rows, config.max_length)
    info = {"source": source, "kind": "instructions", "examples": len(examples), "rows": len(rows),
            "template": config.template, "max_length": config.max_length, "packing": config.packing,
            "responses": responses}
    if dropped:
        info["reserved_dropped"] = (f"{sum(dropped.values())} records of evaluation data were left out: "
                                    + ", ".join(f"{count} of {label}" for label, count in dropped.items()))
    return rows, info


def _training_texts(source: str) -> list[str]:
    """The documents of a text source, refused if it holds reserved evaluation text (data/reserved.py)."""
    texts = read_texts(source)
    hits = reserved_text_hits(texts)
    if hits:
        found = "; ".join(f"{count} lines or documents of {label}" for label, count in hits.items())
        raise LayerpruneError(
            f"{source} holds {found}, which `layerprune eval` measures on (reserved for evaluation); training "
            "on it would make that measure meaningless. Use c4 or dolly (bundled) or data of your own")
    return texts


def _training_examples(source: str, config) -> tuple[list[Example], int]:
    """(instruction examples in a seeded random order, max_samples of them, {evaluation data: records dropped}):
    reserved records (Dolly prompts, task items) are dropped before the draw, so the draw is from what may be
    trained on."""
    records = read_records(source)
    examples, dropped = without_reserved_prompts(records_as_examples(records, source, config.field_map()), records)
    if not examples:
        raise LayerpruneError(f"every record of {source} is reserved for evaluation ({', '.join(dropped)}): "
                              "`layerprune eval` measures on them, and training on them would make that measure "
                              "meaningless")
    if config.max_samples is not None and config.max_samples < 1:
        raise LayerpruneError(f"max_samples must be >= 1, got {config.max_samples}")
    random.Random(config.seed).shuffle(examples)
    return (examples if config.max_samples is None else examples[:config.max_samples]), dropped
