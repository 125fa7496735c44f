"""The whole benchmark of one model: every figure, as a JSON-ready dict.

Settings follow LLM-Pruner's efficiency table (parameters, MACs of a 64-token input, memory, and the
latency of that forward on WikiText-2 test text, batch 1) and Shortened LLaMA's generation setting
(see latency.py).
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch import nn

from layerprune.benchmark.config import BenchConfig
from layerprune.benchmark.inputs import check_length, token_stream
from layerprune.benchmark.latency import generate_forced, generation_latency, prefill_latency
from layerprune.benchmark.macs import count_macs, decode_macs
from layerprune.benchmark.memory import measure_memory, weight_memory
from layerprune.hardware.timing import model_device
from layerprune.models.anatomy import count_parameters, get_anatomy, model_dtype
from layerprune.models.quantize import quantization_record
from layerprune.models.tokens import pad_token_id

Log = Callable[[str], None]


def _inputs(model: nn.Module, tokenizer, config: BenchConfig) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Prefill rows [warmup+runs, seq_len] and generation prompts [max M, prompt_tokens] from one stream."""
    n_rows = config.warmup + config.runs
    n_prompts = max(config.batch_sizes)
    needed = n_rows * config.seq_len + n_prompts * config.prompt_tokens
    vocab = model.config.get_text_config().vocab_size
    stream, source = token_stream(tokenizer, vocab, needed, seed=config.seed)
    prefill = stream[: n_rows * config.seq_len].view(n_rows, config.seq_len)
    prompts = stream[n_rows * config.seq_len :].view(n_prompts, config.prompt_tokens)
    return prefill, prompts, source


def _environment(model: nn.Module) -> dict:
    device = model_device(model)
    env = {
        "device": str(device),
        "dtype": str(model_dtype(model)).replace("torch.", ""),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "quantization": quantization_record(model),  # None unless loaded with --load-in 4bit|8bit
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        env["cpu_count"] = os.cpu_count()
    return env


def benchmark(model: nn.Module, tokenizer, config: BenchConfig, *, name: str = "model", log: Log | None = None) -> dict:
    """Every figure for one model, as a JSON-ready dict (each submodule's docstring says how it is measured)."""
    say = log or (lambda message: None)
    anatomy = get_anatomy(model)
    longest = config.prompt_tokens + max(config.new_tokens)
    check_length(model, max(config.seq_len, longest), "the benchmark")
    prefill_rows, prompts, source = _inputs(model, tokenizer, config)
    result: dict = {"model": name, **_environment(model), "inputs": source, "config": config.model_dump(mode="json")}
    result["layers"] = anatomy.num_layers
    result["params"] = count_parameters(model)

    say(f"{name}: counting MACs of a {config.seq_len}-token forward")
    result["macs"] = count_macs(model, config.seq_len, input_ids=prefill_rows[:1])
    result["decode_macs"] = {
        str(length): decode_macs(model, config.prompt_tokens + length // 2, input_ids=_decode_ids(prompts, model, longest))
        for length in config.new_tokens
    }

    say(f"{name}: measuring memory")
    result["memory"] = _memory(model, prefill_rows, prompts, config)

    say(f"{name}: prefill latency ({config.warmup} warm-ups, {config.runs} runs)")
    result["prefill"] = prefill_latency(model, prefill_rows, config.warmup, config.runs)

    result["generation"] = []
    for m in config.batch_sizes:
        for length in config.new_tokens:
            say(f"{name}: generation M={m} L={length}")
            result["generation"].append(
                generation_latency(model, m, length, config.warmup, config.runs, prompts, config.prompt_tokens)
            )
    return result


def _decode_ids(prompts: torch.Tensor, model: nn.Module, length: int) -> torch.Tensor:
    """One row long enough for a decode-step count: the first prompt, then random ids."""
    vocab = model.config.get_text_config().vocab_size
    tail = torch.randint(0, vocab, (length + 1,), generator=torch.Generator().manual_seed(1))
    return torch.cat([prompts[0], tail])[: length + 1].unsqueeze(0)


@torch.inference_mode()
def _memory(model: nn.Module, prefill_rows: torch.Tensor, prompts: torch.Tensor, config: BenchConfig) -> dict:
    device = model_device(model)
    row = prefill_rows[:1].to(device)
    forward = measure_memory(model, lambda: model(input_ids=row, use_cache=False))
    m, length = max(config.batch_sizes), max(config.new_tokens)
    batch = prompts[:m].to(device)
    generation = measure_memory(model, lambda: generate_forced(model, batch, length, pad_token_id(model.generation_config)))
    return {
        **weight_memory(model),
        "method": forward["method"],
        "forward": {"batch_size": 1, "seq_len": config.seq_len, **_drop_method(forward)},
        "generation": {"batch_size": m, "new_tokens": length, **_drop_method(generation)},
    }


def _drop_method(measured: dict) -> dict:
    return {k: v for k, v in measured.items() if k != "method"}
