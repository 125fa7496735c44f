"""Zero-shot accuracy through lm-evaluation-harness, on the model already in memory.

A thin bridge: `lm_eval.simple_evaluate` with `HFLM(pretrained=<model>)` (no re-save of a pruned model)
and a TaskManager that indexes layerprune's bundled task YAMLs (plus user YAMLs / generated ones).
Prompts, scoring, group aggregation and stderr are lm-eval's own; this module only picks numbers out.
scorer "fast" (the default) is HFLM with shared-prefix log-likelihoods (fast_lm.py): the same requests and
metrics, each distinct context run once; "stock" is HFLM itself.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
from pathlib import Path
from typing import Iterator

from layerprune.errors import LayerpruneError, first_line
from layerprune.evaluation.tasks import TaskEntry, tasks_dir

# lm-eval's defaults (simple_evaluate), written out so that eval.json records them.
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
AVG_METRICS = ("acc", "acc_norm")
SCORERS = {
    "fast": "layerprune-fast: lm-eval's HFLM requests, each distinct context run once (shared-prefix tree)",
    "stock": "lm-eval's HFLM",
}


def evaluate_tasks(
    model,
    tokenizer,
    entries: list[TaskEntry],
    *,
    limit: int | None = None,
    batch_size: int | str = 8,
    avg_metric: str = "acc",
    scorer: str = "fast",
) -> dict:
    """Run lm-eval on `entries`; return per-task acc/acc_norm with stderr, the average and lm-eval's raw results."""
    import lm_eval
    import torch

    if scorer not in SCORERS:
        raise LayerpruneError(f"unknown scorer {scorer!r}; choose {' or '.join(SCORERS)}")
    if avg_metric not in AVG_METRICS:
        raise LayerpruneError(f"unknown --avg-metric {avg_metric!r}; choose acc or acc_norm")
    if tokenizer is None:
        raise LayerpruneError("zero-shot tasks need the model's tokenizer, and this model folder has none")
    with _quiet_lm_eval(), _task_manager(entries) as manager:
        objects = _load_tasks(manager, entries)
        # softmax_dtype float32: log-likelihoods of a bf16/fp16 model are summed in float32 (no-op for fp32).
        lm = _lm_class(scorer)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                               softmax_dtype=torch.float32)
        try:
            results = lm_eval.simple_evaluate(
                model=lm, tasks=objects, task_manager=manager, limit=limit, log_samples=False, **SEEDS
            )
        except AssertionError as err:  # lm-eval's checks of a request are bare asserts
            known = _request_error(err, entries, lm.max_length)
            if known is None:
                raise
            raise known from err
    tasks = {e.name: _task_scores(results, e) for e in entries}
    return {
        "tasks": tasks,
        "average": average(tasks, avg_metric),
        "protocol": {
            "harness": f"lm-evaluation-harness {getattr(lm_eval, '__version__', '?')}",
            "num_fewshot": 0,
            "limit": limit,
            "batch_size": batch_size,
            "softmax_dtype": "float32",
            "scorer": SCORERS[scorer],
            **SEEDS,
        },
        "raw": _raw_results(results),
    }


def _lm_class(scorer: str):
    if scorer == "stock":
        from lm_eval.models.huggingface import HFLM

        return HFLM
    from layerprune.evaluation.fast_lm import FastHFLM  # heavy: lm_eval loads on use

    return FastHFLM


def _request_error(err: AssertionError, entries: list[TaskEntry], max_length: int) -> LayerpruneError | None:
    """One line for the assert lm-eval's HFLM makes on a request it can't score; other asserts stay bugs."""
    import traceback

    frames = traceback.extract_tb(err.__traceback__)
    line = (frames[-1].line or "") if frames else ""
    names = ", ".join(e.name for e in entries)
    if "len(continuation_enc) <= " in line:  # HFLM's assert, or the same one in fast_scorer.build_trees
        return LayerpruneError(
            f"a task ({names}) has an answer longer than the model's context of {max_length} tokens "
            "(max_position_embeddings); lm-eval cannot score it: shorten the answers or use a model with a longer context"
        )
    if "len(context_enc) > 0" in line or "len(continuation_enc) > 0" in line:
        return LayerpruneError(f"a task ({names}) has a prompt or an answer that encodes to no tokens; "
                               "lm-eval cannot score it: check for empty questions or choices")
    return None


def average(tasks: dict[str, dict], metric: str) -> dict:
    """The "Avg Acc" of Reassessing Layer Pruning (arXiv 2411.15558): plain mean over tasks of `metric`
    (acc when a task has no acc_norm)."""
    used = {name: (metric if scores.get(metric) is not None else "acc") for name, scores in tasks.items()}
    values = [tasks[name][m] for name, m in used.items() if tasks[name].get(m) is not None]
    return {
        "metric": metric,
        "value": sum(values) / len(values) if values else None,
        "tasks": len(values),
        "metric_per_task": used,
    }


@contextlib.contextmanager
def _task_manager(entries: list[TaskEntry]) -> Iterator:
    """A TaskManager over the bundled YAMLs, user YAML folders and generated JSONL tasks."""
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="layerprune-tasks-") as generated:
        # Our ~130 bundled YAMLs take seconds to index; JSONL-only or hub-only runs skip them.
        paths = [str(tasks_dir())] if any(e.kind in ("bundled", "yaml") for e in entries) else []
        for entry in entries:
            if entry.generated_yaml is not None:
                (Path(generated) / f"{entry.lm_eval_name}.yaml").write_text(entry.generated_yaml, encoding="utf-8")
            if entry.include_dir is not None and entry.include_dir not in paths:
                paths.append(entry.include_dir)
        if any(e.generated_yaml for e in entries):
            paths.append(generated)
        # Indexing lm-eval's ~15k stock YAMLs takes ~20 s; only hub runs need them.
        stock = any(e.kind == "hub" for e in entries)
        yield TaskManager(include_path=paths, include_defaults=stock)


def _load_tasks(manager, entries: list[TaskEntry]) -> list:
    """Build each task/group now (this reads its data), so a missing dataset is one clear error."""
    objects = []
    for entry in entries:
        try:
            loaded = manager.load([entry.lm_eval_name])
        except Exception as err:  # datasets/hub/yaml errors come in many types; the user needs one line
            text = first_line(err)
            hint = " (hub tasks need a machine that reaches the Hugging Face hub)" if entry.kind == "hub" else ""
            raise LayerpruneError(f"could not load task {entry.name!r} ({entry.lm_eval_name}){hint}: {text}") from err
        name = entry.lm_eval_name
        objects.append(loaded["groups"][name] if name in loaded.get("groups", {}) else loaded["tasks"][name])
    return objects


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _leaf_tasks(results: dict, name: str) -> list[str]:
    children = results.get("group_subtasks", {}).get(name)
    if not children:
        return [name]
    return [leaf for child in children for leaf in _leaf_tasks(results, child)]


def _task_scores(results: dict, entry: TaskEntry) -> dict:
    row = results["results"][entry.lm_eval_name]
    scores: dict = {}
    for metric in AVG_METRICS:
        scores[metric] = _number(row.get(f"{metric},none"))
        scores[f"{metric}_stderr"] = _number(row.get(f"{metric}_stderr,none"))
    n_samples = results.get("n-samples", {})
    leaves = _leaf_tasks(results, entry.lm_eval_name)
    scores["n"] = sum(int(n_samples.get(leaf, {}).get("effective", 0)) for leaf in leaves)
    groups = results.get("group_subtasks", {}).get(entry.lm_eval_name, [])
    subgroups = {results["results"][g].get("alias", g).strip(" -"): _number(results["results"][g].get("acc,none"))
                 for g in groups if g in results.get("group_subtasks", {})}
    if subgroups:
        scores["categories_acc"] = subgroups
    return {**scores, "lm_eval_task": entry.lm_eval_name, "source": entry.kind, "data": entry.data}


def _raw_results(results: dict) -> dict:
    """lm-eval's results without the model object, configs or samples (kept small and JSON-safe)."""
    keep = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples")
    raw = {key: results[key] for key in keep if key in results}
    config = results.get("config", {})
    raw["config"] = {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool, type(None), list))}
    return raw


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """Keep the terminal readable: lm-eval logs every task (and warns once per custom_dataset task) and
    draws one request-building bar per task (124 for MMLU+CMMLU). Errors and the model's
    "Running loglikelihood requests" bar stay."""
    import functools
    from unittest import mock

    import datasets
    import lm_eval.api.task
    from tqdm import tqdm

    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    bars = datasets.utils.logging.is_progress_bar_enabled()
    datasets.utils.logging.disable_progress_bar()
    try:
        with mock.patch.object(lm_eval.api.task, "tqdm", functools.partial(tqdm, disable=True)):
            yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.utils.logging.enable_progress_bar()
