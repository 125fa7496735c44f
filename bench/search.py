"""Drop-set search vs select auto on SmolLM2-135M: which 8 layers, at what cost.

Scores every whole-layer metric once on the calibration text (C4, seed 0) and takes each metric's own
drop-set of --num-layers layers; select auto's choice is the one with the lowest loss on the validation
text (C4, seed 1000). The greedy search (select: search) chooses its drop-set on that same validation
text. Both are then measured on held-out C4 text neither ever read: the bundled `c4-heldout` slice
(documents 1200-1499 of the bundled sample; calibration and validation draw from documents 0-1199).

Cost: block forward calls of the search against a naive search that reruns every candidate from the
embeddings (target <= 0.5x), and the search's wall time (target <= 3 min on 2 cores).

    .venv/bin/python bench/search.py [--model smollm2-135m] [--num-layers 8] [--beam 1] [--swap] [--windows 200] \
        [--threads 2] [--out runs/bench-search.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

DEFAULT_METRICS = ("block-influence,relative-magnitude,angular,perplexity,taylor,magnitude-l1,magnitude-l2,"
                   "reverse-order")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-layers", type=int, default=8)
    parser.add_argument("--beam", type=int, default=1)
    parser.add_argument("--swap", action="store_true", help="then one swap pass (select search's search_swap)")
    parser.add_argument("--metrics", default=DEFAULT_METRICS)
    parser.add_argument("--n-samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--windows", type=int, default=200, help="held-out C4 windows of 128 tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto", help="auto (SmolLM2: fp32) | bf16 | fp16 | fp32")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from layerprune.data.calibration import load_calibration
    from layerprune.importance import compute_many
    from layerprune.selection.drop_set_losses import DropSetLosses
    from layerprune.models.loading import load_model
    from layerprune.models.surgery import kept_layers
    from layerprune.selection.scores import metric_requests, parse_metrics, select_for_each
    from layerprune.selection.search import SearchPath, swap_pass

    loaded = load_model(args.model, dtype=args.dtype)
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    layers = kept_layers(model)
    n, k = len(layers), args.num_layers

    def text(seed):
        return load_calibration(tokenizer, "c4", n_samples=args.n_samples, seq_len=args.seq_len, seed=seed)

    calibration, validation = text(0), text(1000)

    # select auto: every metric's own drop-set, judged on the validation text
    started = time.perf_counter()
    names = parse_metrics(args.metrics)
    scores = compute_many(model, metric_requests(names, n, block_size=k), calibration)
    drop_sets = {name: sel.dropped for name, sel in select_for_each(scores, k).items()}
    judge = DropSetLosses(model, validation)
    metric_loss = {name: judge.loss([layers.index(i) for i in d]) for name, d in drop_sets.items()}
    auto_seconds = time.perf_counter() - started
    best = min(metric_loss, key=metric_loss.get)
    print(f"select auto: {best} {drop_sets[best]} (validation loss {metric_loss[best]:.4f}; "
          f"{auto_seconds:.0f} s for scoring and judging)", flush=True)

    # select search: a fresh cache, so its counts are the search's own
    started = time.perf_counter()
    losses = DropSetLosses(model, validation)
    path = SearchPath(losses, list(range(n)), layers, beam=args.beam,
                      log=lambda m: print("  " + m, flush=True))
    point = path.at(k)
    positions, swaps = point.positions, []
    if args.swap:
        positions, swaps = swap_pass(losses, positions, list(range(n)), layers,
                                     log=lambda m: print("  " + m, flush=True))
    search_seconds = time.perf_counter() - started
    print(f"search: {search_seconds:.0f} s, {losses.block_forwards} block forwards "
          f"({losses.naive_block_forwards} naive)", flush=True)
    searched = sorted(layers[p] for p in positions)
    candidates = sum(len(step["candidates"]) for step in path.steps)
    with torch.no_grad():  # one whole forward of the validation text, for the naive search's time
        timer = time.perf_counter()
        for ids, mask in validation.batches(len(validation.input_ids)):
            model(input_ids=ids, attention_mask=mask, use_cache=False)
        full_forward_s = time.perf_counter() - timer

    heldout = {}
    if args.windows:  # 0: timing only
        heldout = {"unpruned": held_out_ppl(model, tokenizer, [], args.windows)}
        heldout["search"] = held_out_ppl(model, tokenizer, searched, args.windows)
        for name in dict.fromkeys([best, "block-influence"]):
            if name in drop_sets:
                heldout[name] = held_out_ppl(model, tokenizer, drop_sets[name], args.windows)

    result = {
        "model": args.model, "dtype": str(model.dtype), "layers": n, "num_layers": k, "beam": args.beam,
        "validation": validation.description, "unpruned_validation_loss": losses.intact_loss,
        "metrics": {name: {"dropped": drop_sets[name], "validation_loss": metric_loss[name]} for name in names},
        "select_auto": {"chosen": best, "dropped": drop_sets[best], "validation_loss": metric_loss[best],
                        "seconds": auto_seconds},
        "search": {"dropped": searched, "validation_loss": losses.loss(positions), "seconds": search_seconds,
                   "greedy": {"dropped": sorted(layers[p] for p in point.positions), "validation_loss": point.loss},
                   "swaps": swaps,
                   "candidates": candidates, "block_forwards": losses.block_forwards,
                   "naive_block_forwards": losses.naive_block_forwards,
                   "naive_seconds_estimate": (candidates + 1) * full_forward_s},
        "heldout_c4_ppl": heldout, "heldout_windows": args.windows,
    }
    report(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result))


@torch.no_grad()
def held_out_ppl(model, tokenizer, dropped: list[int], windows: int) -> float:
    """Perplexity on the bundled held-out C4 slice (first `windows` 128-token windows) without `dropped`."""
    from layerprune.evaluation.perplexity import load_ppl_text, perplexity
    from layerprune.models.surgery import remove_layers

    pruned = remove_layers(copy.deepcopy(model), dropped) if dropped else model
    text = load_ppl_text("c4-heldout").text
    return perplexity(pruned, tokenizer, text, seq_len=128, max_windows=windows, progress=False)["ppl"]


def report(r: dict) -> None:
    s, a = r["search"], r["select_auto"]
    print(f"\n{r['model']} ({r['dtype']}): {r['num_layers']} of {r['layers']} layers; validation = {r['validation']}")
    heldout = r["heldout_c4_ppl"]
    print(f"unpruned: validation loss {r['unpruned_validation_loss']:.4f}, held-out C4 ppl "
          f"{heldout.get('unpruned', float('nan')):.2f} ({r['heldout_windows']} windows of 128 tokens)")
    print("\n| selection | dropped | validation loss | held-out C4 ppl |\n|---|---|---|---|")
    for name, m in sorted(r["metrics"].items(), key=lambda kv: kv[1]["validation_loss"]):
        ppl = heldout.get(name)
        print(f"| {name}{' (select auto)' if name == a['chosen'] else ''} | {','.join(map(str, m['dropped']))} | "
              f"{m['validation_loss']:.4f} | {f'{ppl:.1f}' if ppl else ''} |")
    label = f"search (beam {r['beam']}{', swap' if s['swaps'] else ''})"
    print(f"| {label} | {','.join(map(str, s['dropped']))} | {s['validation_loss']:.4f} | "
          f"{heldout.get('search', float('nan')):.1f} |")
    ratio = s["block_forwards"] / s["naive_block_forwards"]
    print(f"\nsearch: {s['candidates']} candidates, {s['block_forwards']} block forwards vs "
          f"{s['naive_block_forwards']} "
          f"naive = {ratio:.3f}x (target <= 0.5); wall {s['seconds']:.0f} s (target <= 180 s; naive estimate "
          f"{s['naive_seconds_estimate']:.0f} s); select auto's scoring + judging {a['seconds']:.0f} s")
    gain = math.exp(a["validation_loss"] - s["validation_loss"])
    print(f"validation perplexity: select auto / search = {gain:.3f}")


if __name__ == "__main__":
    main()
