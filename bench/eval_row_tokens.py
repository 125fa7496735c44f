"""Benchmark: the fast scorer's time on MMLU + CMMLU (first 5 documents of each subtask, fp32, 2 threads)
for each row length given, one after the other in one process, with each run's accuracy (must be identical).

    python bench/eval_row_tokens.py 256 512 1024 256
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main(row_lengths: list[int]) -> None:
    import torch

    from layerprune.evaluation.fast_lm import FastHFLM
    from layerprune.evaluation.harness import evaluate_tasks
    from layerprune.evaluation.tasks import resolve_tasks
    from layerprune.models.loading import load_model

    torch.set_num_threads(2)
    loaded = load_model("smollm2-135m", dtype="fp32")
    entries = resolve_tasks("mmlu,cmmlu")
    original = FastHFLM._loglikelihood_tokens
    for rows in row_lengths:
        FastHFLM.__init__.__kwdefaults__["row_tokens"] = rows  # evaluate_tasks builds the scorer itself
        timed = {}

        def scoring(self, *args, **kwargs):
            start = time.perf_counter()
            out = original(self, *args, **kwargs)
            timed["seconds"] = time.perf_counter() - start
            return out

        FastHFLM._loglikelihood_tokens = scoring
        result = evaluate_tasks(loaded.model, loaded.tokenizer, entries, limit=5, batch_size=8, scorer="fast")
        FastHFLM._loglikelihood_tokens = original
        accuracy = {name: task.get("acc") for name, task in result["tasks"].items()}
        print("ROWS", rows, round(timed["seconds"], 1), accuracy, flush=True)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [256, 512])
