"""What pruning buys: parameters, MACs, memory, prefill latency and generation speed.

Settings follow the seeds:
- Table 9 of the main seed (after LLM-Pruner): parameters, MACs of a 64-token input, memory, and the
  latency of that forward on WikiText-2 test text (batch 1);
- Shortened LLaMA (after FlexGen): generation latency T of M prompts of 12 tokens producing exactly
  L new tokens each (greedy, min_new_tokens = max_new_tokens), throughput M*L/T, mean of 20 runs
  after 10 warm-ups.

How each figure is measured (and its limits):
- MACs: torch's FlopCounterMode on a real forward (FLOPs = 2 * MACs). It counts matmuls, including
  attention (QK^T and AV over the full T x T square, causal mask not discounted, as torch and
  LLM-Pruner count). torch registers SDPA formulas for the CUDA kernels only, so the CPU kernel is
  mapped to the same formula here. Kernels outside torch (flash-attn 2) are not seen. Element-wise
  work (norms, activations, softmax, RoPE) is not counted. MoE models count the experts that ran.
  bitsandbytes 4/8-bit linears run custom kernels: their MACs come from forward hooks (rows x in x out).
- Memory: weight bytes are exact (parameters at their dtype, tied weights once; bitsandbytes weights
  as packed bytes plus their scales). Peaks are the CUDA max allocated bytes on GPU; on CPU they are
  the process's peak resident memory (VmHWM, reset through /proc/self/clear_refs after handing freed
  heap back with malloc_trim), falling back to sampling RSS in a thread. The CPU "increase" is a lower
  bound: the allocator reuses memory it holds.
- Latency: wall clock with CUDA synchronised before and after each timed call; mean, std, median.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.models.anatomy import count_parameters, get_anatomy, model_dtype, parameter_bytes
from layerprune.models.quantize import is_bnb_linear, quantization_record

PROMPT_TOKENS = 12  # Shortened LLaMA: "12 input tokens"
Log = Callable[[str], None]


# ----------------------------------------------------------------------------- configuration


@dataclass
class BenchConfig:
    """One benchmark's settings; `validate()` before loading anything heavy."""

    seq_len: int = 64
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4])
    new_tokens: list[int] = field(default_factory=lambda: [128])
    warmup: int = 10
    runs: int = 20
    prompt_tokens: int = PROMPT_TOKENS
    seed: int = 0

    def validate(self) -> "BenchConfig":
        if self.seq_len < 1:
            raise LayerpruneError(f"--seq-len must be at least 1 (got {self.seq_len})")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise LayerpruneError(f"batch sizes must be at least 1 (got {self.batch_sizes})")
        if not self.new_tokens or min(self.new_tokens) < 1:
            raise LayerpruneError(f"new token counts must be at least 1 (got {self.new_tokens})")
        if self.warmup < 0:
            raise LayerpruneError(f"--warmup must be 0 or more (got {self.warmup})")
        if self.runs < 1:
            raise LayerpruneError(f"--runs must be at least 1 (got {self.runs})")
        if self.prompt_tokens < 1:
            raise LayerpruneError(f"prompt tokens must be at least 1 (got {self.prompt_tokens})")
        return self


# ----------------------------------------------------------------------------- small helpers


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cuda_devices(model: nn.Module) -> list[torch.device]:
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def synchronize(model: nn.Module) -> None:
    """Wait for queued GPU work, or a timer measures only the kernel launches."""
    for device in _cuda_devices(model):
        torch.cuda.synchronize(device)


def timed(model: nn.Module, fn: Callable[[], object]) -> float:
    """Seconds fn() takes, its queued GPU work included."""
    synchronize(model)
    start = time.perf_counter()
    fn()
    synchronize(model)
    return time.perf_counter() - start


def _stats(samples: list[float]) -> dict:
    return {
        "mean_s": statistics.fmean(samples),
        "std_s": statistics.stdev(samples) if len(samples) > 1 else 0.0,
        "median_s": statistics.median(samples),
        "min_s": min(samples),
        "runs": len(samples),
        "times_s": samples,
    }


def _max_positions(model: nn.Module) -> int | None:
    config = model.config.get_text_config()
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_length(model: nn.Module, tokens: int, what: str) -> None:
    limit = _max_positions(model)
    if limit is not None and tokens > limit:
        raise LayerpruneError(f"{what} needs {tokens} positions but the model has only {limit}")


# ----------------------------------------------------------------------------- inputs


def token_stream(tokenizer, vocab_size: int, n_tokens: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """n_tokens of WikiText-2 test text (the seed's latency data), or random ids without a tokenizer."""
    if tokenizer is None:
        generator = torch.Generator().manual_seed(seed)
        return torch.randint(0, vocab_size, (n_tokens,), generator=generator), "random token ids (no tokenizer)"
    from layerprune.data.sources import read_bundled_lines

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


# ----------------------------------------------------------------------------- MACs

_CPU_SDPA = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _attention_ops() -> set:
    """Op packets whose FLOPs are attention (SDPA kernels and the bmm of eager attention)."""
    aten = torch.ops.aten
    names = [
        "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
        "_flash_attention_forward", "_efficient_attention_forward", "bmm", "baddbmm",
    ]
    return {getattr(aten, n) for n in names if hasattr(aten, n)}


def _flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    # torch only knows the CUDA SDPA kernels; without this the CPU kernel's attention counts as 0.
    mapping = {_CPU_SDPA: _sdpa_flops} if _CPU_SDPA is not None else {}
    return FlopCounterMode(display=False, custom_mapping=mapping)


@contextlib.contextmanager
def _packed_linear_macs(model: nn.Module):
    """{module name: MACs} of bitsandbytes Linear4bit/8bitLt calls: their custom kernels are invisible to
    FlopCounterMode, so their MACs (rows x in x out, as for nn.Linear) are counted from forward hooks."""
    macs: dict[str, int] = {}

    def hook(name):
        def count(module, inputs, output):
            rows = inputs[0].numel() // module.in_features
            macs[name] = macs.get(name, 0) + rows * module.in_features * module.out_features
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if is_bnb_linear(m)]
    try:
        yield macs
    finally:
        for handle in handles:
            handle.remove()


def _unseen_macs(model: nn.Module, packed: dict[str, int], counts: dict) -> dict[str, int]:
    # Paths that dequantize and then call a torch matmul (bnb on GPU, several tokens) are seen: count the rest.
    root = type(model).__name__
    return {n: max(0, m - sum(counts.get(f"{root}.{n}", {}).values()) // 2) for n, m in packed.items()}


def _summarize_flops(model: nn.Module, counts: dict, batch_size: int, unseen: dict[str, int] | None = None) -> dict:
    anatomy = get_anatomy(model)
    root = type(model).__name__
    attention_ops = _attention_ops()
    glob = counts.get("Global", {})
    unseen = unseen or {}
    flops = sum(glob.values()) + 2 * sum(unseen.values())
    attention = sum(v for op, v in glob.items() if op in attention_ops)
    per_layer = [
        sum(counts.get(f"{root}.{anatomy.layers_path}.{i}", {}).values()) // 2
        + sum(m for n, m in unseen.items() if n.startswith(f"{anatomy.layers_path}.{i}."))
        for i in range(anatomy.num_layers)
    ]
    by_op = {str(op): v // 2 for op, v in glob.items()}
    if unseen:
        by_op["bitsandbytes linear (hooks)"] = sum(unseen.values())
    return {
        "macs": flops // 2,
        "flops": flops,
        "attention_macs": attention // 2,
        "per_layer_macs": per_layer,
        "batch_size": batch_size,
        "by_op": by_op,
    }


@torch.inference_mode()
def count_macs(model: nn.Module, seq_len: int = 64, batch_size: int = 1, input_ids: torch.Tensor | None = None) -> dict:
    """MACs (and FLOPs = 2 MACs) of one full forward of batch_size x seq_len tokens, logits at every position."""
    _check_length(model, seq_len, f"a {seq_len}-token forward")
    if input_ids is None:
        input_ids = torch.randint(0, model.config.get_text_config().vocab_size, (batch_size, seq_len))
    input_ids = input_ids.to(model_device(model))
    counter = _flop_counter()
    with _packed_linear_macs(model) as packed, counter:
        model(input_ids=input_ids, use_cache=False)
    counts = counter.get_flop_counts()
    result = _summarize_flops(model, counts, input_ids.shape[0], _unseen_macs(model, packed, counts))
    return {"seq_len": input_ids.shape[1], **result, "counted_with": "torch.utils.flop_counter.FlopCounterMode"}


@torch.inference_mode()
def decode_macs(model: nn.Module, context: int, input_ids: torch.Tensor | None = None) -> int:
    """MACs of generating one token with `context` tokens already in the KV cache (batch 1)."""
    _check_length(model, context + 1, f"decoding at context {context}")
    if input_ids is None:
        input_ids = torch.randint(0, model.config.get_text_config().vocab_size, (1, context + 1))
    input_ids = input_ids[:, : context + 1].to(model_device(model))
    cache = model(input_ids=input_ids[:, :context], use_cache=True).past_key_values
    counter = _flop_counter()
    with _packed_linear_macs(model) as packed, counter:
        model(input_ids=input_ids[:, context:], past_key_values=cache, use_cache=True)
    counts = counter.get_flop_counts()
    return sum(counts.get("Global", {}).values()) // 2 + sum(_unseen_macs(model, packed, counts).values())


# ----------------------------------------------------------------------------- memory


def _status_kb(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS so an RSS increase reflects new allocations (glibc only)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets VmHWM to the current RSS. True if it worked."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kb("VmHWM"), _status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 1024


def _current_rss() -> int | None:
    rss = _status_kb("VmRSS")
    if rss is not None:
        return rss * 1024
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        return None


class _RssSampler:
    """Fallback peak RSS: poll every millisecond in a thread (can miss very short spikes)."""

    def __init__(self) -> None:
        self.peak = _current_rss() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _current_rss() or 0)
            time.sleep(0.001)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss() or 0)


def _cpu_peak(fn: Callable[[], object]) -> dict:
    _trim_heap()
    before = _current_rss()
    if before is None:
        fn()
        return {"peak_bytes": None, "peak_increase_bytes": None, "method": "unavailable (no /proc, no psutil)"}
    if _reset_peak_rss():
        fn()
        peak = _status_kb("VmHWM") * 1024
        method = "CPU peak RSS (VmHWM reset via /proc/self/clear_refs)"
    else:
        with _RssSampler() as sampler:
            fn()
        peak = sampler.peak
        method = "CPU peak RSS (sampled every 1 ms)"
    return {"peak_bytes": peak, "peak_increase_bytes": max(0, peak - before), "method": method}


def _cuda_peak(model: nn.Module, fn: Callable[[], object]) -> dict:
    devices = _cuda_devices(model)
    synchronize(model)
    gc.collect()
    before = 0
    for device in devices:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before += torch.cuda.memory_allocated(device)
    fn()
    synchronize(model)
    peak = sum(torch.cuda.max_memory_allocated(d) for d in devices)
    return {"peak_bytes": peak, "peak_increase_bytes": peak - before, "method": "CUDA max allocated"}


def measure_memory(model: nn.Module, fn: Callable[[], object]) -> dict:
    """Peak memory while fn() runs: {'peak_bytes', 'peak_increase_bytes', 'method'}."""
    if _cuda_devices(model):
        return _cuda_peak(model, fn)
    return _cpu_peak(fn)


def weight_memory(model: nn.Module) -> dict:
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return {"weights_bytes": parameter_bytes(model), "buffers_bytes": buffers}


# ----------------------------------------------------------------------------- latency


def _generate(model: nn.Module, prompts: torch.Tensor, new_tokens: int, pad_token_id: int) -> torch.Tensor:
    return model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,  # forced length: EOS is suppressed until L tokens exist
        do_sample=False,
        pad_token_id=pad_token_id,
    )


def generation_pad_id(model: nn.Module) -> int:
    """The pad id generate() should use: the generation config's pad, else its (first) EOS, else 0."""
    config = model.generation_config
    for value in (config.pad_token_id, config.eos_token_id, 0):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


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
    _check_length(model, prompts.shape[1] + new_tokens, f"{prompts.shape[1]} prompt + {new_tokens} new tokens")
    pad = generation_pad_id(model)
    samples = []
    for i in range(warmup + runs):
        output: list[torch.Tensor] = []
        seconds = timed(model, lambda: output.append(_generate(model, prompts, new_tokens, pad)))
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


# ----------------------------------------------------------------------------- the whole benchmark


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
    """Every figure for one model, as a JSON-ready dict (see the module docstring for methods)."""
    config.validate()
    say = log or (lambda message: None)
    anatomy = get_anatomy(model)
    longest = config.prompt_tokens + max(config.new_tokens)
    _check_length(model, max(config.seq_len, longest), "the benchmark")
    prefill_rows, prompts, source = _inputs(model, tokenizer, config)
    result: dict = {"model": name, **_environment(model), "inputs": source, "config": asdict(config)}
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
    generation = measure_memory(model, lambda: _generate(model, batch, length, generation_pad_id(model)))
    return {
        **weight_memory(model),
        "method": forward["method"],
        "forward": {"batch_size": 1, "seq_len": config.seq_len, **_drop_method(forward)},
        "generation": {"batch_size": m, "new_tokens": length, **_drop_method(generation)},
    }


def _drop_method(measured: dict) -> dict:
    return {k: v for k, v in measured.items() if k != "method"}


# ----------------------------------------------------------------------------- figures and comparison


@dataclass(frozen=True)
class Figure:
    label: str
    value: float | None
    unit: str  # "count" | "bytes" | "s" | "tok/s" | "macs"
    lower_is_better: bool = True
    ideal: str | None = None  # which MACs ratio is this figure's ideal gain: "macs" | "decode:<L>"
    std: float | None = None


def figures(result: dict) -> dict[str, Figure]:
    """A flat, ordered view of one benchmark result: key -> Figure."""
    mem = result["memory"]
    out = {
        "layers": Figure("decoder layers", result["layers"], "count"),
        "params_total": Figure("parameters", result["params"]["total"], "count"),
        "params_non_embedding": Figure("non-embedding parameters", result["params"]["non_embedding"], "count"),
        "weights_bytes": Figure("weight memory", mem["weights_bytes"], "bytes"),
        "macs": Figure(f"MACs ({result['macs']['seq_len']} tokens)", result["macs"]["macs"], "macs", ideal="macs"),
        "memory_forward": Figure("peak memory, forward", mem["forward"]["peak_bytes"], "bytes"),
        "memory_forward_increase": Figure(
            "peak memory increase, forward", mem["forward"]["peak_increase_bytes"], "bytes"
        ),
        "memory_generation": Figure(
            f"peak memory, generation M={mem['generation']['batch_size']} L={mem['generation']['new_tokens']}",
            mem["generation"]["peak_bytes"], "bytes",
        ),
        "memory_generation_increase": Figure(
            "peak memory increase, generation", mem["generation"]["peak_increase_bytes"], "bytes"
        ),
        "prefill": Figure(
            f"prefill latency ({result['prefill']['seq_len']} tokens)", result["prefill"]["mean_s"], "s",
            ideal="macs", std=result["prefill"]["std_s"],
        ),
    }
    for gen in result["generation"]:
        m, length = gen["batch_size"], gen["new_tokens"]
        out[f"gen_latency_M{m}_L{length}"] = Figure(
            f"generation latency M={m} L={length}", gen["mean_s"], "s", ideal=f"decode:{length}", std=gen["std_s"]
        )
        out[f"gen_throughput_M{m}_L{length}"] = Figure(
            f"throughput M={m} L={length}", gen["throughput_tok_s"], "tok/s", lower_is_better=False,
            ideal=f"decode:{length}",
        )
    return out


def _ideal(kind: str | None, base: dict, other: dict) -> float | None:
    """Speedup the compute ratio promises: base MACs / other MACs (per decoded token for generation)."""
    if kind is None:
        return None
    if kind == "macs":
        return _ratio(base["macs"]["macs"], other["macs"]["macs"])
    length = kind.split(":", 1)[1]
    return _ratio(base.get("decode_macs", {}).get(length), other.get("decode_macs", {}).get(length))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def compare(base: dict, other: dict) -> dict:
    """How much better `other` is than `base` on every figure both have.

    gain = base/other for costs (latency, bytes, MACs), other/base for throughput (> 1: other is better).
    ideal = base MACs / other MACs (per decoded token for generation figures); of_ideal = gain / ideal,
    the share of the theoretical speedup that is real.
    """
    a, b = figures(base), figures(other)
    rows = []
    for key, fa in a.items():
        fb = b.get(key)
        if fb is None:
            continue
        gain = _ratio(fa.value, fb.value) if fa.lower_is_better else _ratio(fb.value, fa.value)
        ideal = _ideal(fa.ideal, base, other)
        rows.append({
            "key": key, "label": fa.label, "unit": fa.unit, "base": fa.value, "other": fb.value,
            "gain": gain, "ideal": ideal, "of_ideal": _ratio(gain, ideal),
        })
    return {
        "base": base["model"],
        "other": other["model"],
        "ideal_speedup": _ratio(base["macs"]["macs"], other["macs"]["macs"]),
        "layer_ratio": _ratio(base["layers"], other["layers"]),
        "rows": rows,
    }


# ----------------------------------------------------------------------------- rendering


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "bytes":
        return f"{value / 2**20:,.1f} MiB"
    if unit == "s":
        return f"{value * 1000:,.1f} ms"
    if unit == "tok/s":
        return f"{value:,.1f} tok/s"
    if unit == "macs":
        return f"{value / 1e9:,.3f} G" if value >= 1e8 else f"{value:,.0f}"
    return f"{value:,.0f}"


def _gain(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def table_rows(base: dict, other: dict | None = None, comparison: dict | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (one model, or two with gains)."""
    fa = figures(base)
    if other is None:
        rows = [[f.label, format_value(f.value, f.unit) + (f" ± {f.std * 1000:.1f}" if f.std else "")] for f in fa.values()]
        return ["figure", base["model"]], rows
    comparison = comparison or compare(base, other)
    fb = figures(other)
    rows = []
    for row in comparison["rows"]:
        a, b = fa[row["key"]], fb[row["key"]]
        rows.append([
            row["label"],
            format_value(a.value, a.unit) + (f" ± {a.std * 1000:.1f}" if a.std else ""),
            format_value(b.value, b.unit) + (f" ± {b.std * 1000:.1f}" if b.std else ""),
            _gain(row["gain"]), _gain(row["ideal"]), _share(row["of_ideal"]),
        ])
    return ["figure", base["model"], other["model"], "gain", "ideal (MACs)", "of ideal"], rows


def markdown(base: dict, other: dict | None = None, comparison: dict | None = None) -> str:
    """bench.md: the summary table plus how it was measured."""
    header, rows = table_rows(base, other, comparison)
    lines = ["# layerprune bench", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|")
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += ["", *_method_notes(base, other)]
    return "\n".join(lines) + "\n"


def _method_notes(base: dict, other: dict | None) -> list[str]:
    notes = []
    if "device" in base:
        notes.append(
            f"- device {base['device']}, dtype {base['dtype']}, torch {base['torch']}, {base['torch_threads']} "
            f"threads; inputs: {base['inputs']}."
        )
    for result in [base] + ([other] if other is not None else []):
        quant = result.get("quantization")
        if quant:
            notes.append(f"- {result['model']}: {quant['quantized_linears']} linear layers quantized by bitsandbytes "
                         f"{quant['load_in']} ({quant['quant_type']}); weight memory counts the packed bytes.")
    cfg = base.get("config", {})
    if cfg:
        notes.append(
            f"- latency: mean ± std (ms) of {cfg['runs']} runs after {cfg['warmup']} warm-ups; generation = "
            f"{cfg['prompt_tokens']} prompt tokens, exactly L new tokens (greedy), throughput = M*L / latency."
        )
    notes.append(
        "- MACs counted with torch FlopCounterMode (FLOPs = 2 MACs), attention QK^T and AV included; "
        "ideal = MACs ratio (per decoded token for generation rows); gain > 1 means the second model is better."
    )
    if "method" in base["memory"]:
        notes.append(
            f"- memory: {base['memory']['method']}; peak = the whole process on CPU (Python and libraries "
            "included), max allocated on GPU; increase = above the level before the call (on CPU a lower bound)."
        )
    if other is not None and other.get("inputs") != base.get("inputs"):
        notes.append(f"- the second model's inputs: {other.get('inputs')}.")
    return notes


def plot_latency(results: list[dict], path: str | Path) -> Path:
    """Generation latency and throughput vs batch size, one line per (model, L)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(10, 4))
    for result in results:
        for length in sorted({g["new_tokens"] for g in result["generation"]}):
            runs = sorted((g for g in result["generation"] if g["new_tokens"] == length), key=lambda g: g["batch_size"])
            sizes = [g["batch_size"] for g in runs]
            label = f"{result['model']} (L={length})"
            ax_lat.errorbar(sizes, [g["mean_s"] for g in runs], yerr=[g["std_s"] for g in runs], marker="o",
                            capsize=3, label=label)
            ax_thr.plot(sizes, [g["throughput_tok_s"] for g in runs], marker="o", label=label)
    sizes_seen = sorted({g["batch_size"] for r in results for g in r["generation"]})
    for ax, ylabel in ((ax_lat, "latency (s)"), (ax_thr, "throughput (tokens/s)")):
        ax.set_xlabel("batch size M")
        ax.set_ylabel(ylabel)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes_seen, [str(s) for s in sizes_seen])  # 1, 4, 16 rather than 2^k
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"generation on {results[0]['device']} ({results[0]['dtype']})")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_outputs(folder: str | Path, base: dict, other: dict | None = None) -> dict | None:
    """bench.json, bench.md and bench.png in `folder`; returns the comparison (None for one model)."""
    from layerprune.outputs import write_json

    folder = Path(folder)
    comparison = compare(base, other) if other is not None else None
    models = [base] + ([other] if other is not None else [])
    write_json(folder / "bench.json", {"models": models, "comparison": comparison})
    (folder / "bench.md").write_text(markdown(base, other, comparison))
    plot_latency(models, folder / "bench.png")
    return comparison
