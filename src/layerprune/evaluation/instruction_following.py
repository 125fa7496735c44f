"""Instruction following against the unpruned model, on held-out instructions nothing trained on.

Two measures on the reserved Dolly slice (`dolly-heldout`, rendered with the model's chat template):

- **Response KL**: teacher-forced KL(reference || model) of the next-token distributions at every token of
  the data set's own responses, mean over those tokens (nats; 0 for the reference itself).
- **Greedy agreement**: the model's and the reference's greedy responses to the same prompts (at most
  `new_tokens` tokens each, cut at end of turn), compared token by token: ROUGE-L F1 (longest common
  subsequence), the common prefix in tokens, and the share that is identical (1 for the reference).

The reference's responses are cached on disk (keyed by its weights, the prompts and the token budget), so
a study generates them once. "On the Limits of Layer Pruning for Generative Reasoning in LLMs" (arXiv
2602.01997) finds that classification recovers after healing while generation does not: these measures
show the second.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from layerprune.data.collate import PadCollator
from layerprune.data.instructions import Example, load_examples, prompt_ids, tokenize_examples
from layerprune.models.logits import causal_lm_parts, head_logits, labelled_positions
from layerprune.models.responses import GENERATION_BATCH, greedy_responses, reference_responses
from layerprune.models.tokens import IGNORE_INDEX, pad_token_id

HELDOUT = "dolly-heldout"
MAX_PROMPT_CHARS = 1000  # long reading-comprehension contexts would dominate the time
MAX_LENGTH = 256  # prompt + response tokens of the KL rows: long responses are cut (half the time of 512)


def heldout_examples(n: int) -> list[Example]:
    """The first n reserved examples in a fixed shuffled order (every category early), prompts of at most
    MAX_PROMPT_CHARS characters."""
    examples = [e for e in load_examples(HELDOUT) if len(e.instruction) + len(e.context) <= MAX_PROMPT_CHARS]
    random.Random(0).shuffle(examples)
    return examples[:n]


@torch.no_grad()
def response_kl(model, reference, rows: list[dict], *, pad_id: int, batch_size: int = 8) -> dict:
    """Mean KL(reference || model) over the labelled (response) tokens of `rows`, and the token count."""
    total, tokens = 0.0, 0
    device, ref_device = next(model.parameters()).device, next(reference.parameters()).device
    for start in range(0, len(rows), batch_size):
        batch = PadCollator(pad_id)(rows[start:start + batch_size])
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        log_p = _label_log_probs(reference, ids.to(ref_device), mask.to(ref_device), labels.to(ref_device))
        log_q = _label_log_probs(model, ids.to(device), mask.to(device), labels.to(device)).to(log_p.device)
        total += float((log_p.exp() * (log_p - log_q)).sum())
        tokens += len(log_p)
    return {"kl": total / max(tokens, 1), "tokens": tokens}


def _label_log_probs(model, ids, mask, labels) -> torch.Tensor:
    """log-softmax (fp32) of the next-token logits at the labelled positions."""
    _, head, softcap = causal_lm_parts(model)
    hidden, _ = labelled_positions(model, ids, mask, labels)
    return torch.cat([torch.log_softmax(head_logits(head, chunk, softcap), -1) for chunk in hidden.split(512)]) \
        if len(hidden) else hidden.new_zeros(0, head.weight.shape[0]).float()


def lcs_length(a: list[int], b: list[int]) -> int:
    """Longest common subsequence of two token lists (dynamic programming, one row at a time)."""
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(candidate: list[int], reference: list[int]) -> float:
    """ROUGE-L F1 on tokens; two empty responses agree fully."""
    if not candidate and not reference:
        return 1.0
    common = lcs_length(candidate, reference)
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def agreement(responses: list[list[int]], references: list[list[int]]) -> dict:
    """Mean ROUGE-L F1, mean common prefix (tokens) and the share of identical responses."""
    n = len(references)
    return {"rouge_l": sum(rouge_l(c, r) for c, r in zip(responses, references)) / n,
            "prefix_tokens": sum(common_prefix(c, r) for c, r in zip(responses, references)) / n,
            "identical": sum(c == r for c, r in zip(responses, references)) / n,
            "prompts": n}


def instruction_following(model, reference, tokenizer, *, prompts: int = 100, new_tokens: int = 48,
                          batch_size: int = 8, cache_dir: Path | None = None) -> dict:
    """Both measures of `model` against `reference` (None: the model is the reference, so KL 0, agreement 1)."""
    examples = heldout_examples(prompts)
    rows = tokenize_examples(examples, tokenizer, max_length=MAX_LENGTH)
    pad = pad_token_id(tokenizer)
    asked = [prompt_ids(tokenizer, e) for e in examples]
    protocol = {"data": HELDOUT, "prompts": len(examples), "new_tokens": new_tokens, "max_length": MAX_LENGTH,
                "template": "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"}
    if reference is None or reference is model:
        tokens = sum(sum(1 for label in r["labels"][1:] if label != IGNORE_INDEX) for r in rows)
        return {"kl": 0.0, "tokens": tokens, "rouge_l": 1.0, "prefix_tokens": None, "identical": 1.0,
                "reference": "itself", "protocol": protocol}
    kl = response_kl(model, reference, rows, pad_id=pad, batch_size=batch_size)
    references = reference_responses(reference, tokenizer, asked, new_tokens=new_tokens,
                                     batch_size=GENERATION_BATCH, cache_dir=cache_dir)
    responses = greedy_responses(model, tokenizer, asked, new_tokens=new_tokens, batch_size=GENERATION_BATCH)
    examples_out = [{"prompt": e.instruction[:200], "model": tokenizer.decode(c), "reference": tokenizer.decode(r)}
                    for e, c, r in list(zip(examples, responses, references))[:5]]
    return {**kl, **agreement(responses, references), "reference": getattr(reference, "name_or_path", ""),
            "protocol": protocol, "examples": examples_out}
