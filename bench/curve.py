"""The trade-off curve of SmolLM2-135M: validation perplexity for 0..15 layers removed, every selection.

What `layerprune curve smollm2-135m --metric all,search --max-drop 15` computes, timed: every whole-layer
metric scored once on the calibration text (C4, seed 0), each metric's own drop-set of size k and the
greedy search path measured on the validation text (C4, seed 1000) by one shared cache. Prints the
table, the knees, the count a perplexity-ratio target allows per selection, the block forwards against
a naive evaluation of every candidate, and the wall time (target <= 5 min on 2 cores). Writes
curve.json / curve.csv / curve.png to --out.

    .venv/bin/python bench/curve.py [--model smollm2-135m] [--max-drop 15] [--metrics all] \
        [--max-ppl-ratio 2.0] [--threads 2] [--out runs/bench-curve]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-drop", type=float, default=15)
    parser.add_argument("--metrics", default="all", help="comma list of whole-layer metrics, or all")
    parser.add_argument("--no-search", action="store_true", help="metrics only")
    parser.add_argument("--max-ppl-ratio", type=float, default=2.0)
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="auto (SmolLM2: fp32) | bf16 | fp16 | fp32")
    parser.add_argument("--out", default="runs/bench-curve")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from layerprune.selection.config import CurveConfig
    from layerprune.selection.curve import curve_for_loaded, write_curve_files
    from layerprune.models.loading import load_model
    from layerprune.selection.scores import parse_metrics

    names = parse_metrics(args.metrics) + ([] if args.no_search else ["search"])
    config = CurveConfig(metric=names, max_drop=args.max_drop, max_ppl_ratio=args.max_ppl_ratio,
                         search_beam=args.beam)
    loaded = load_model(args.model, dtype=args.dtype)
    started = time.perf_counter()
    record = curve_for_loaded(loaded, config, log=lambda m: print("  " + m, flush=True))
    seconds = time.perf_counter() - started
    write_curve_files(args.out, record, overwrite=True)

    names = list(record["curves"])
    print(f"\n{args.model}: validation perplexity by layers removed (unpruned {record['unpruned_perplexity']:.2f})\n")
    print("| k | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for k in range(record["max_drop"] + 1):
        cells = [f"{record['curves'][n][k]['perplexity']:.1f}" + ("*" if record["knees"][n] == k else "")
                 if k < len(record["curves"][n]) else "-" for n in names]
        print(f"| {k} | " + " | ".join(cells) + " |")
    print(f"\n* knee (loss rising > {record['knee_slope']} nats per layer after it)")
    for name, chosen in record["chosen"].items():
        print(f"{name}: {record['target']['name']} allows {chosen['k']} layers "
              f"({','.join(map(str, chosen['dropped'])) or 'none'})")
    ratio = record["block_forwards"] / record["naive_block_forwards"]
    print(f"\nblock forwards {record['block_forwards']} vs {record['naive_block_forwards']} naive ({ratio:.3f}x); "
          f"scoring {record['seconds']['scoring']:.0f} s, curve {record['seconds']['curve']:.0f} s, "
          f"total {seconds:.0f} s (target <= 300 s); files in {args.out}")


if __name__ == "__main__":
    main()
