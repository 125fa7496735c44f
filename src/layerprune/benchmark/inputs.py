"""The benchmark's tokens, and the check that a measurement fits the model's context."""

from __future__ import annotations

import torch
from torch import nn

from layerprune.data.sources import read_bundled_lines
from layerprune.errors import LayerpruneError

PROMPT_TOKENS = 12  # Shortened LLaMA: "12 input tokens"


def token_stream(tokenizer, vocab_size: int, n_tokens: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """n_tokens of WikiText-2 test text (LLM-Pruner's latency data), or random ids without a tokenizer."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (n_tokens,), generator=generator), "random token ids (no tokenizer)"

    lines = read_bundled_lines("wikitext2")
    take = 256
    while True:
        # Joined as in the standard WikiText-2 perplexity recipe; no BOS, raw text tokens.
        ids = tokenizer("\n\n".join(lines[:take]), add_special_tokens=False).input_ids
        if len(ids) >= n_tokens or take >= len(lines):
            break
        take *= 2
    if len(ids) < n_tokens:
        raise LayerpruneError(f"WikiText-2 test has {len(ids)} tokens, fewer than the {n_tokens} the benchmark needs")
    return torch.tensor(ids[:n_tokens], dtype=torch.long), "WikiText-2 test text"


def _max_positions(model: nn.Module) -> int | None:
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_length(model: nn.Module, tokens: int, what: str) -> None:
    limit = _max_positions(model)
    if limit is not None and tokens > limit:
        raise LayerpruneError(f"{what} needs {tokens} positions but the model has only {limit}")
