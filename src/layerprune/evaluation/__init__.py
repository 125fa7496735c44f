"""Measuring a (pruned) model.

perplexity.py  WikiText-2 / PTB / any text, LLM-Pruner windows or HF sliding windows, explicit BOS
tasks.py       zero-shot task registry: bundled lm-eval task YAMLs (resources/tasks) or stock hub tasks
custom.py      user tasks: an lm-eval YAML, or a multiple-choice JSONL turned into one
harness.py     lm_eval.simple_evaluate on the in-memory model (HFLM), numbers picked out
generation.py  greedy generation samples
run.py         a whole evaluation: plan (checked up front) -> eval.json / eval.md / samples.json
results.py     markdown tables and side-by-side comparison of two eval.json files
checksums.py   sha256 of the data files an evaluation scored (uncompressed for .gz)
"""
