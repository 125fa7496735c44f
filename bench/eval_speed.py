"""Benchmark: lm-eval log-likelihoods through the shared-prefix scorer (`--scorer fast`) vs stock HFLM.

Both evaluate the same zero-shot tasks (first --limit documents of each (sub)task) on one model, in one
process, one after the other (--repeats 2 runs stock, fast, fast, stock and keeps each one's fastest).
Prints and writes (--out) the targets the fast scorer is held to:

- wall time of the log-likelihood pass, fast / stock (target <= 0.33), its CPU time (steadier on a shared
  machine) and the wall time of the whole task evaluation
- every request's log-likelihood: largest |fast - stock| (fp32 target <= 1e-4); is-greedy flags that differ
- acc and acc_norm of every task (target: identical)
- the fast scorer's time estimate (printed after its first ESTIMATE_AFTER_S seconds) and its progress bar's
  ETA after 60 s, each divided by the real time (target: within 0.5-2)

    python bench/eval_speed.py [--model smollm2-135m] [--tasks paper] [--limit 2] [--dtype fp32] \\
        [--threads 2] [--batch-size 8] [--repeats 1] [--out runs/eval-speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def timed_evaluation(scorer: str, loaded, entries, limit: int, batch_size: int) -> dict:
    """evaluate_tasks with one scorer; the loglikelihood call's wall time, results and progress timeline."""
    from lm_eval.models.huggingface import HFLM

    from layerprune.evaluation.fast_lm import FastHFLM
    from layerprune.evaluation.harness import evaluate_tasks

    cls = FastHFLM if scorer == "fast" else HFLM
    original = cls.loglikelihood
    calls = []

    def recorded(self, requests, disable_tqdm=False):
        start, cpu = time.perf_counter(), time.process_time()
        out = original(self, requests, disable_tqdm=disable_tqdm)
        calls.append({"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu,
                      "results": out, "progress": getattr(self, "progress", None)})
        return out

    start = time.perf_counter()
    with mock.patch.object(cls, "loglikelihood", recorded):
        result = evaluate_tasks(loaded.model, loaded.tokenizer, entries, limit=limit, batch_size=batch_size,
                                scorer=scorer)
    (call,) = calls  # lm-eval sends every task's log-likelihood requests in one call
    return {"evaluation_seconds": time.perf_counter() - start, "scoring_seconds": call["seconds"],
            "scoring_cpu_seconds": call["cpu_seconds"],
            "results": call["results"], "progress": call["progress"], "tasks": result["tasks"]}


def eta_quality(progress) -> dict:
    """The scorer's own estimate and the bar's ETA after 60 s (elapsed + remaining), each over the real time."""
    if progress is None or not progress.timeline:
        return {}
    real = progress.timeline[-1][0]
    out = {"real_seconds": round(real, 1)}
    if progress.estimate is not None:
        timed, estimate = progress.estimate
        out["estimate"] = {"after_seconds": round(timed, 1), "estimated_seconds": round(estimate, 1),
                           "ratio": round(estimate / real, 3)}
    after = next(((t, work) for t, _, work in progress.timeline if t >= 60), None)
    if after is not None and after[0] < real:  # the bar advances by padded tokens: its ETA is this
        eta_total = after[0] * sum(progress.work) / after[1]
        out["bar_eta_at_60s"] = {"estimated_seconds": round(eta_total, 1), "ratio": round(eta_total / real, 3)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tasks", default="paper")
    parser.add_argument("--limit", type=int, default=2, help="documents per (sub)task")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1, choices=[1, 2])
    parser.add_argument("--out", default="runs/eval-speed.json")
    args = parser.parse_args()

    import torch

    from layerprune.evaluation.tasks import resolve_tasks
    from layerprune.models.loading import load_model

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, dtype=args.dtype)
    entries = resolve_tasks(args.tasks)
    order = ["stock", "fast"] if args.repeats == 1 else ["stock", "fast", "fast", "stock"]
    runs: dict[str, dict] = {}
    for scorer in order:
        run = timed_evaluation(scorer, loaded, entries, args.limit, args.batch_size)
        print(f"{scorer}: scoring {run['scoring_seconds']:.1f} s ({run['scoring_cpu_seconds']:.1f} s CPU), "
              f"evaluation {run['evaluation_seconds']:.1f} s",
              file=sys.stderr, flush=True)
        best = runs.get(scorer)
        if best is None or run["scoring_seconds"] < best["scoring_seconds"]:
            runs[scorer] = run
    stock, fast = runs["stock"], runs["fast"]
    diffs = [abs(a[0] - b[0]) for a, b in zip(stock["results"], fast["results"])]
    flags = sum(a[1] != b[1] for a, b in zip(stock["results"], fast["results"]))
    tasks = {name: {f"{m}_{s}": runs[s]["tasks"][name][m] for m in ("acc", "acc_norm") for s in ("stock", "fast")}
             for name in stock["tasks"]}
    identical = all(t[f"{m}_stock"] == t[f"{m}_fast"] for t in tasks.values() for m in ("acc", "acc_norm"))
    report = {
        "model": args.model, "dtype": args.dtype, "tasks": args.tasks, "limit": args.limit,
        "threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats,
        "requests": len(stock["results"]),
        "contexts": fast["progress"].contexts if fast["progress"] else None,
        "scoring_seconds": {"stock": round(stock["scoring_seconds"], 1), "fast": round(fast["scoring_seconds"], 1)},
        "evaluation_seconds": {"stock": round(stock["evaluation_seconds"], 1),
                               "fast": round(fast["evaluation_seconds"], 1)},
        "scoring_cpu_seconds": {"stock": round(stock["scoring_cpu_seconds"], 1),
                                "fast": round(fast["scoring_cpu_seconds"], 1)},
        "scoring_ratio": round(fast["scoring_seconds"] / stock["scoring_seconds"], 3),
        "scoring_cpu_ratio": round(fast["scoring_cpu_seconds"] / stock["scoring_cpu_seconds"], 3),
        "evaluation_ratio": round(fast["evaluation_seconds"] / stock["evaluation_seconds"], 3),
        "max_abs_loglikelihood_diff": max(diffs), "greedy_flag_mismatches": flags,
        "metrics_identical": identical, "per_task": tasks, "eta": eta_quality(fast["progress"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "per_task"}, indent=2))
    print(f"scoring fast/stock {report['scoring_ratio']:.2f} wall, {report['scoring_cpu_ratio']:.2f} CPU "
          f"(target <= 0.33); max |dLL| {max(diffs):.2e} "
          f"(target <= 1e-4); acc/acc_norm identical: {identical}; wrote {args.out}")


if __name__ == "__main__":
    main()
