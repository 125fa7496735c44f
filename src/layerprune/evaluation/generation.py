"""Greedy generation samples from a fixed prompt set (Table E of Reassessing Layer Pruning, arXiv 2411.15558)."""

from __future__ import annotations

import torch

from layerprune.models.tokens import pad_token_id

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Give three tips for staying healthy.",
    "Explain in one sentence what a neural network is.",
]


def build_inputs(tokenizer, prompt: str) -> dict:
    """Chat template when the tokenizer has one, else the raw prompt."""
    if getattr(tokenizer, "chat_template", None):
        encoded = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        return dict(encoded)
    return dict(tokenizer(prompt, return_tensors="pt"))


@torch.no_grad()
def generate_samples(model, tokenizer, prompts: list[str] | None = None, max_new_tokens: int = 40) -> list[dict]:
    """Greedy continuations, one dict per prompt: {"prompt", "completion"}."""
    device = next(model.parameters()).device
    samples = []
    for prompt in prompts or DEFAULT_PROMPTS:
        inputs = {k: v.to(device) for k, v in build_inputs(tokenizer, prompt).items()}
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad_token_id(tokenizer),
        )
        completion = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        samples.append({"prompt": prompt, "completion": completion.strip()})
    return samples
