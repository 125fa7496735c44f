"""Benchmark: does removing 8 of SmolLM2's 30 layers make generation as much faster as it should?

Two copies of SmolLM2-135M (bf16) are loaded in one process; the second loses original layers
12-17, 25, 26 (the block-influence choice). Both generate exactly L tokens from the same
12-token WikiText-2 prompt (greedy, batch M), with warm-ups and timed runs interleaved ABAB so
that drift (frequency, other processes) hits both models alike.

Prints the measured decode speedup (mean and median latency ratios), the ideal speedups
(layer ratio 30/22; MACs ratio of a 64-token forward; MACs ratio per decoded token, which holds the
fixed embedding/lm_head cost) and measured / ideal. Target: >= 0.95 of the per-token MACs ideal.

    python bench/pruned_speedup.py [--batch-size 1] [--new-tokens 128] [--warmup 10] [--runs 20] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from layerprune.benchmark.inputs import PROMPT_TOKENS, token_stream  # noqa: E402
from layerprune.benchmark.latency import generation_latency  # noqa: E402
from layerprune.benchmark.macs import count_macs, decode_macs  # noqa: E402
from layerprune.models.loading import load_model  # noqa: E402
from layerprune.models.surgery import remove_layers  # noqa: E402
from layerprune.hardware.timing import model_device  # noqa: E402

DROP = [12, 13, 14, 15, 16, 17, 25, 26]


def interleaved_latencies(models: dict, prompts: torch.Tensor, batch_size: int, new_tokens: int,
                          warmup: int, runs: int) -> dict[str, list[float]]:
    """ABAB...: one generation per model per round; the first `warmup` rounds are not kept."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_ in range(warmup + runs):
        for name, model in models.items():
            seconds = generation_latency(model, batch_size, new_tokens, warmup=0, runs=1, prompts=prompts)["mean_s"]
            if round_ >= warmup:
                times[name].append(seconds)
        print(f"  round {round_ + 1}/{warmup + runs}" + (" (warm-up)" if round_ < warmup else ""),
              file=sys.stderr, flush=True)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # keep the output to the figures

    full = load_model("smollm2-135m", dtype="bf16", device=args.device)
    pruned = copy.deepcopy(full.model)
    remove_layers(pruned, DROP)
    models = {"full": full.model, "pruned": pruned}
    n_full, n_pruned = full.model.config.num_hidden_layers, pruned.config.num_hidden_layers

    stream, source = token_stream(full.tokenizer, full.model.config.vocab_size, args.batch_size * PROMPT_TOKENS)
    prompts = stream.view(args.batch_size, PROMPT_TOKENS)
    macs = {name: count_macs(m, 64)["macs"] for name, m in models.items()}
    context = PROMPT_TOKENS + args.new_tokens // 2  # mean context over the generation
    per_token = {name: decode_macs(m, context) for name, m in models.items()}

    print(f"SmolLM2-135M bf16 on {model_device(full.model)} ({torch.get_num_threads()} threads): "
          f"{n_full} vs {n_pruned} layers (dropped {DROP})")
    print(f"M={args.batch_size} L={args.new_tokens}, {PROMPT_TOKENS}-token prompt from {source}, "
          f"{args.warmup} warm-ups + {args.runs} runs, interleaved ABAB")
    times = interleaved_latencies(models, prompts, args.batch_size, args.new_tokens, args.warmup, args.runs)
    for name in models:
        t = times[name]
        tokens = args.batch_size * args.new_tokens
        print(f"  {name:>6}: {statistics.fmean(t):.3f} s ± {statistics.stdev(t) if len(t) > 1 else 0:.3f} "
              f"(median {statistics.median(t):.3f} s), {tokens / statistics.fmean(t):.1f} tok/s")

    speedup_mean = statistics.fmean(times["full"]) / statistics.fmean(times["pruned"])
    speedup_median = statistics.median(times["full"]) / statistics.median(times["pruned"])
    # Each ABAB round is a pair run moments apart; the median of the pair ratios cancels slow drift best.
    speedup_paired = statistics.median(a / b for a, b in zip(times["full"], times["pruned"]))
    ideal_layers = n_full / n_pruned
    ideal_macs64 = macs["full"] / macs["pruned"]
    ideal_decode = per_token["full"] / per_token["pruned"]
    print(f"measured decode speedup: {speedup_mean:.3f}x (mean), {speedup_median:.3f}x (median), "
          f"{speedup_paired:.3f}x (median of ABAB pair ratios)")
    print(f"ideal: layers {n_full}/{n_pruned} = {ideal_layers:.3f}x; MACs (64-token forward) {ideal_macs64:.3f}x; "
          f"MACs per decoded token (context {context}) {ideal_decode:.3f}x")
    for label, ideal in (("per-token MACs", ideal_decode), ("layer ratio", ideal_layers)):
        print(f"measured / ideal ({label}): {speedup_mean / ideal:.3f} (mean), {speedup_median / ideal:.3f} "
              f"(median), {speedup_paired / ideal:.3f} (paired)" + ("   target >= 0.95" if ideal is ideal_decode else ""))


if __name__ == "__main__":
    main()
