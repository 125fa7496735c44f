"""Instruction (SFT) data for healing: prompt/response pairs tokenized with loss on responses only.

Sources: the bundled Dolly-15k (`dolly`; `dolly-heldout`, every 30th record, is reserved for evaluation), Alpaca-format files (`instruction`/`input`/`output`, as
alpaca-cleaned ships them: a JSON list or JSONL), any JSONL or hub dataset with a field mapping.
Prompt formats: the tokenizer's chat template (`chat`), or the Stanford Alpaca prompt (`alpaca`,
what Reassessing Layer Pruning, arXiv 2411.15558, trained with). Raw text for continued pretraining
comes from `data.sources`.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from layerprune.data.sources import bundled_path
from layerprune.errors import LayerpruneError, first_line
from layerprune.files.user_files import parse_json_object, read_text
from layerprune.models.tokens import IGNORE_INDEX

ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class FieldMap:
    """Which fields of a record hold the instruction, the optional context and the response."""

    instruction: str = "instruction"
    context: str | None = "context"
    response: str = "response"

    @classmethod
    def parse(cls, text: str) -> "FieldMap":
        """'instruction=question,context=,response=answer' (an empty context means none)."""
        values = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, value = part.partition("=")
            if key not in ("instruction", "context", "response"):
                raise LayerpruneError(f"unknown field role {key!r} in {text!r}; use instruction=, context=, response=")
            values[key] = value or None
        return cls(**values)


DOLLY = FieldMap("instruction", "context", "response")
ALPACA = FieldMap("instruction", "input", "output")


@dataclass
class Example:
    instruction: str
    context: str
    response: str


def load_examples(source: str, *, fields: FieldMap | None = None, max_samples: int | None = None, seed: int = 0) -> list[Example]:
    """Read prompt/response examples; the format (Dolly or Alpaca) is detected from the fields."""
    examples = records_as_examples(read_records(source), source, fields)
    if max_samples is not None:
        if max_samples < 1:
            raise LayerpruneError(f"max_samples must be >= 1, got {max_samples}")
        random.Random(seed).shuffle(examples)
        examples = examples[:max_samples]
    return examples


def records_as_examples(records: list[dict], source: str, fields: FieldMap | None = None) -> list[Example]:
    """One example per record (in order), its fields read as `fields` says or as the first record's format."""
    if not records:
        raise LayerpruneError(f"instruction data {source!r} is empty")
    fields = fields or _detect_fields(records[0], source)
    examples = []
    for number, record in enumerate(records, 1):
        for role in (fields.instruction, fields.response):
            if role not in record:
                raise LayerpruneError(f"{source} record {number} has no field {role!r} (fields: {', '.join(record)})")
        context = record.get(fields.context, "") if fields.context else ""
        texts = {fields.instruction: record[fields.instruction], fields.response: record[fields.response]}
        if fields.context:
            texts[fields.context] = "" if context is None else context
        for role, value in texts.items():  # str(None) would train on the text "None"
            if not isinstance(value, str):
                shown = "null" if value is None else type(value).__name__
                raise LayerpruneError(f"{source} record {number}: field {role!r} is {shown}, not text; fix or remove "
                                      "that record")
        examples.append(Example(texts[fields.instruction], texts.get(fields.context, ""), texts[fields.response]))
    return examples


def _detect_fields(record: dict, source: str) -> FieldMap:
    if {"instruction", "response"} <= record.keys():
        return DOLLY
    if {"instruction", "output"} <= record.keys():
        return ALPACA
    raise LayerpruneError(
        f"cannot tell the format of {source}: fields {', '.join(record)}; expected Dolly (instruction/context/response) "
        "or Alpaca (instruction/input/output), or pass a field mapping"
    )


# Every 30th record of the bundled Dolly-15k (500 of 15,011; the file is sorted by category, so every
# category is represented) is reserved for measuring instruction following: `dolly-heldout`. Training on
# `dolly` never sees them, nor any record with the same instruction and context.
DOLLY_HELDOUT_EVERY = 30


def dolly_records() -> list[dict]:
    with gzip.open(bundled_path("dolly-15k.jsonl.gz"), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def dolly_split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(training records, reserved records) of the bundled Dolly: duplicates of a reserved record's prompt
    stay out of training too."""
    reserved = [r for i, r in enumerate(records) if i % DOLLY_HELDOUT_EVERY == DOLLY_HELDOUT_EVERY - 1]
    prompts = {(r["instruction"], r.get("context", "")) for r in reserved}
    training = [r for i, r in enumerate(records) if i % DOLLY_HELDOUT_EVERY != DOLLY_HELDOUT_EVERY - 1
                and (r["instruction"], r.get("context", "")) not in prompts]
    return training, reserved


def read_records(source: str) -> list[dict]:
    """The JSON records of instruction data: bundled Dolly, a .json list or .jsonl file, or a hub dataset."""
    if source in ("dolly", "dolly-heldout"):
        training, reserved = dolly_split(dolly_records())
        return training if source == "dolly" else reserved
    path = Path(source).expanduser()
    if path.is_dir():
        raise LayerpruneError(f"{path} is a folder, not an instruction data file (.json/.jsonl)")
    if path.is_file():
        text = read_text(path, "instruction data file")
        if text.lstrip().startswith("["):  # alpaca_data_cleaned.json is one JSON list
            try:
                records = json.loads(text)
            except json.JSONDecodeError as err:
                raise LayerpruneError(f"{path} is not valid JSON ({err.msg} at line {err.lineno})") from None
            except RecursionError:
                raise LayerpruneError(f"{path} is nested too deeply to be instruction records") from None
            if not isinstance(records, list):
                raise LayerpruneError(f"{path} must hold a JSON list of records")
            for number, record in enumerate(records, 1):
                if not isinstance(record, dict):
                    raise LayerpruneError(f"{path}: record {number} of the list is not a JSON object")
            return records
        return [parse_json_object(line, f"{path}:{number}")
                for number, line in enumerate(text.split("\n"), 1) if line.strip()]
    if source == "alpaca":
        raise LayerpruneError(
            "alpaca-cleaned is not bundled (it could not be obtained offline); download "
            "alpaca_data_cleaned.json and pass its path, or use the hub id yahma/alpaca-cleaned"
        )
    if source.count("/") == 1 and not source.startswith((".", "/", "~")):
        try:
            import datasets

            return list(datasets.load_dataset(source, split="train"))
        except Exception as err:  # datasets raises many types; the user needs one line
            raise LayerpruneError(f"could not load hub dataset {source!r}: {first_line(err)}") from err
    raise LayerpruneError(f"instruction data not found: {source} (use dolly, a .json/.jsonl file or a hub dataset id)")


def render_prompt(example: Example, tokenizer, template: str) -> tuple[str, str]:
    """(prompt text, response text) for a template: chat | alpaca."""
    if template == "alpaca":
        pattern = ALPACA_PROMPT if example.context.strip() else ALPACA_PROMPT_NO_INPUT
        response = example.response + (tokenizer.eos_token or "")
        return pattern.format(instruction=example.instruction, context=example.context), response
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise LayerpruneError("the tokenizer has no chat template; use template 'alpaca'")
        user = example.instruction + (f"\n\n{example.context}" if example.context.strip() else "")
        messages = [{"role": "user", "content": user}]
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            messages + [{"role": "assistant", "content": example.response}], tokenize=False
        )
        if not full.startswith(prompt):
            raise LayerpruneError("the chat template renders the prompt differently with and without the answer")
        return prompt, full[len(prompt):]
    raise LayerpruneError(f"unknown prompt template {template!r}; use chat or alpaca")


# Bounds on what reaches the tokenizer: a JSONL line of 200 MB took over 14 GB in it and aborted in Rust.
# No token is longer than MAX_CHARS_PER_TOKEN characters in practice, so a field cut there still gives every
# one of the max_length tokens a row keeps; general text is tokenized in pieces of PIECE_CHARS.
MAX_CHARS_PER_TOKEN = 100
PIECE_CHARS = 1_000_000


def tokenize_example(example: Example, tokenizer, *, template: str, max_length: int) -> dict | None:
    """input_ids + labels where prompt tokens are IGNORE_INDEX; None if no response token fits."""
    cap = max_length * MAX_CHARS_PER_TOKEN  # a row keeps max_length tokens: the rest of a field is never read
    example = Example(example.instruction[:cap], example.context[:cap], example.response[:cap])
    prompt, response = render_prompt(example, tokenizer, template)
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) and not prompt.startswith(tokenizer.bos_token or "\0") else []
    prompt_ids = bos + tokenizer(prompt, add_special_tokens=False).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids
    input_ids = (prompt_ids + response_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + response_ids)[:max_length]
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def _adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    probe = tokenizer("hello").input_ids
    return bos is not None and bool(probe) and probe[0] == bos


def tokenize_examples(examples: list[Example], tokenizer, *, template: str = "auto", max_length: int = 1024) -> list[dict]:
    """Tokenize every example; template 'auto' = chat template if the tokenizer has one, else alpaca."""
    if template == "auto":
        template = "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"
    rows = [tokenize_example(e, tokenizer, template=template, max_length=max_length) for e in examples]
    rows = [r for r in rows if r is not None]
    if not rows:
        raise LayerpruneError(f"no example has a response token within max_length={max_length}")
    return rows


def tokenize_text(texts: list[str], tokenizer, *, max_length: int, max_samples: int | None = None) -> list[dict]:
    """Continued pretraining: documents joined with EOS and cut into blocks; loss on every token."""
    stream: list[int] = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    limit = max_samples * max_length if max_samples else None
    for text in texts:
        for piece in text_pieces(text):
            stream.extend(tokenizer(piece, add_special_tokens=False).input_ids)
        stream.extend(eos)
        if limit and len(stream) >= limit:
            break
    blocks = [stream[i : i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)]
    if max_samples:
        blocks = blocks[:max_samples]
    if not blocks:
        raise LayerpruneError(f"the text is shorter than one block of {max_length} tokens")
    return [{"input_ids": b, "labels": list(b)} for b in blocks]


def text_pieces(text: str, size: int | None = None):
    """The text in pieces of at most `size` (PIECE_CHARS) characters, each cut after a whitespace where there
    is one (so no word is split), for a tokenizer whose memory grows with its input."""
    size = size or PIECE_CHARS
    start = 0
    while len(text) - start > size:
        end = start + size
        space = max(text.rfind(" ", start, end), text.rfind("\n", start, end))
        end = space + 1 if space > start else end
        yield text[start:end]
        start = end
    yield text[start:]


def pack(rows: list[dict], max_length: int) -> list[dict]:
    """Greedy packing of tokenized examples into blocks of at most max_length (fewer pad tokens).

    Examples in one block attend to each other (no block-diagonal mask), as in TRL's simple packing.
    """
    packed: list[dict] = []
    current = {"input_ids": [], "labels": []}
    for row in rows:
        if current["input_ids"] and len(current["input_ids"]) + len(row["input_ids"]) > max_length:
            packed.append(current)
            current = {"input_ids": [], "labels": []}
        current["input_ids"] = current["input_ids"] + row["input_ids"]
        current["labels"] = current["labels"] + row["labels"]
    if current["input_ids"]:
        packed.append(current)
    return packed


def prompt_ids(tokenizer, example: Example, template: str = "auto") -> list[int]:
    """The prompt as training renders it (auto: the chat template when there is one), ready for generation."""
    row = tokenize_examples([Example(example.instruction, example.context, " ")], tokenizer, template=template,
                            max_length=4096)[0]
    return [t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
