"""Greedy responses of a model to tokenized prompts, and their on-disk cache (keyed by the weights)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from layerprune.errors import LayerpruneError
from layerprune.files.outputs import read_json, write_json
from layerprune.models.fingerprint import teacher_fingerprint
from layerprune.models.tokens import pad_token_id

GENERATION_BATCH = 32  # prompts generated at once: fewer, wider steps (50 s vs 64 s for 100 prompts at 8)


@torch.no_grad()
def greedy_responses(model, tokenizer, prompts: list[list[int]], *, new_tokens: int, batch_size: int = 8,
                     progress: str | None = None) -> list[list[int]]:
    """Greedy continuations (token ids, cut after the first end-of-turn/EOS token) of left-padded prompts,
    batched in order of length (little padding when prompt lengths vary), returned in the prompts' order."""
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    stops = _stop_ids(model, tokenizer)
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(order), batch_size), desc=progress, unit="batch", leave=False,
                      disable=progress is None):
        numbers = order[start:start + batch_size]
        batch = [prompts[i] for i in numbers]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                   pad_token_id=pad, eos_token_id=sorted(stops) or None)
        for number, row in zip(numbers, generated[:, width:].tolist()):
            out[number] = _cut(row, stops)
    return out


def _stop_ids(model, tokenizer) -> set[int]:
    ids = getattr(model.generation_config, "eos_token_id", None) or tokenizer.eos_token_id
    return set(ids if isinstance(ids, list) else [ids]) - {None}


def _cut(tokens: list[int], stops: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stops:
            return tokens[:i]
    return tokens


def reference_responses(reference, tokenizer, prompts: list[list[int]], *, new_tokens: int, batch_size: int,
                        cache_dir: Path | None) -> list[list[int]]:
    """greedy_responses of the reference, from the on-disk cache when it made them before."""
    path = None
    if cache_dir is not None:
        path = responses_path(reference, prompts, new_tokens=new_tokens, batch_size=batch_size, cache_dir=cache_dir)
        cached = read_cached_responses(path, len(prompts))
        if cached is not None:
            return cached
    responses = greedy_responses(reference, tokenizer, prompts, new_tokens=new_tokens, batch_size=batch_size)
    if path is not None:
        write_cached_responses(path, responses)
    return responses


def _digest(responses: list) -> str:
    return hashlib.sha256(json.dumps(responses, separators=(",", ":")).encode()).hexdigest()


def write_cached_responses(path: Path, responses: list[list[int]]) -> None:
    """Cache responses with a digest of their content, so an edited file is recognised as such."""
    write_json(path, {"responses": responses, "sha256": _digest(responses)})


def read_cached_responses(path: Path, count: int) -> list[list[int]] | None:
    """The cached responses, or None to generate them again: a file missing, damaged, of an older layout, or
    edited by hand (its content no longer matches the digest written with it) is never used."""
    try:
        record = read_json(path, missing_ok=True) if path.is_file() else None
    except LayerpruneError:
        return None
    responses = record.get("responses") if isinstance(record, dict) else None
    if not (isinstance(responses, list) and len(responses) == count and record.get("sha256") == _digest(responses)):
        return None
    if not all(isinstance(r, list) and all(isinstance(t, int) and t >= 0 for t in r) for r in responses):
        return None
    return responses


def responses_path(reference, prompts: list[list[int]], *, new_tokens: int, batch_size: int, cache_dir: Path,
                   compute: str | None = None) -> Path:
    """Where the reference's greedy responses to `prompts` are cached (keyed by its weights, the prompts, the
    token budget, the batch and the compute dtype)."""
    key = {"model": teacher_fingerprint(reference, cache_dir), "prompts": prompts, "new_tokens": new_tokens,
           "batch_size": batch_size, "batches": "by length", "dtype": str(next(reference.parameters()).dtype)}
    if compute is not None:
        key["compute"] = compute
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"responses-{name}.json"
