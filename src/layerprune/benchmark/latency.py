"""Latency of a prefill forward and of forced-length generation.

Generation follows Shortened LLaMA (after FlexGen): the latency T of M prompts of 12 tokens producing
exactly L new tokens each (greedy, min_new_tokens = max_new_tokens), throughput M*L/T, mean of 20 runs
after 10 warm-ups. Wall clock with CUDA synchronised before and after each timed call; mean, std, median.
"""

from __future__ import annotations

import statistics

import torch
from torch import nn

from layerprune.benchmark.inputs import PROMPT_TOKENS, check_length
from layerprune.errors import LayerpruneError
from layerprune.hardware.timing import model_device, timed
from layerprune.models.tokens import pad_token_id


def _stats(samples: list[float]) -> dict:
    return {
        "mean_s": statistics.fmean(samples),
        "std_s": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "runs": len(samples),
        "times_s": samples,
    }


def generate_forced(model: nn.Module, prompts: torch.Tensor, new_tokens: int, pad_token_id: int) -> torch.Tensor:
    """Greedy generation of exactly `new_tokens` tokens after every prompt."""
    return model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # forced length: EOS is suppressed until L tokens exist
        do_sample=False,
        pad_token_id=pad_token_id,
    )


@torch.inference_mode()
def prefill_latency(model: nn.Module, inputs: torch.Tensor, warmup: int = 10, runs: int = 20) -> dict:
    """Seconds of one forward of a [1, T] row of `inputs` ([n, T]), each call on the next row.

    The same forward as `count_macs` (no KV cache, logits at every position), so its speedup
    can be held against the MACs ratio.
    """
    inputs = inputs.to(model_device(model))
    samples = []
    for i in range(warmup + runs):
        row = inputs[i % inputs.shape[0]].unsqueeze(0)
        seconds = timed(model, lambda: model(input_ids=row, use_cache=False))
        if i >= warmup:
            samples.append(seconds)
    return {"batch_size": 1, "seq_len": inputs.shape[1], "warmup": warmup, **_stats(samples)}


@torch.inference_mode()
def generation_latency(
    model: nn.Module,
    batch_size: int,
    new_tokens: int,
    warmup: int = 10,
    runs: int = 20,
    prompts: torch.Tensor | None = None,
    prompt_tokens: int = PROMPT_TOKENS,
) -> dict:
    """Latency of producing exactly batch_size x new_tokens tokens (greedy) and throughput M*L/T.

    prompts: [>= batch_size, prompt_tokens] token ids (random when None).
    """
    if prompts is None:
        vocab = model.config.get_text_config().vocab_size
        prompts = torch.randint(0, vocab, (batch_size, prompt_tokens), generator=torch.Generator().manual_seed(0))
    if prompts.shape[0] < batch_size:
        raise LayerpruneError(f"{prompts.shape[0]} prompts given for a batch of {batch_size}")
    prompts = prompts[:batch_size].to(model_device(model))
    check_length(model, prompts.shape[1] + new_tokens, f"{prompts.shape[1]} prompt + {new_tokens} new tokens")
    pad = pad_token_id(model.generation_config)
    samples = []
    for i in range(warmup + runs):
        output: list[torch.Tensor] = []
        seconds = timed(model, lambda: output.append(generate_forced(model, prompts, new_tokens, pad)))
        produced = output[0].shape[1] - prompts.shape[1]
        if produced != new_tokens:
            raise LayerpruneError(f"generation produced {produced} tokens instead of the forced {new_tokens}")
        if i >= warmup:
            samples.append(seconds)
    stats = _stats(samples)
    return {
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "prompt_tokens": prompts.shape[1],
        "warmup": warmup,
        "tokens_per_run": batch_size * produced,  # measured from the output, after the forced-length check
        **stats,
        "throughput_tok_s": batch_size * new_tokens / stats["mean_s"],
    }
