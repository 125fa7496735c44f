"""Zero-shot task registry: user names -> bundled lm-eval task YAMLs (offline) or stock hub tasks.

The bundled task YAMLs live in resources/tasks/ (task names prefixed `lp_`). They copy lm-eval's
stock prompts and metrics and only swap the data: `custom_dataset: !function
layerprune.evaluation.tasks.load_bundled` reads the gzip copies in resources/data/tasks/ (see its
MANIFEST.md). So the folder also works with the stock `lm_eval --include_path` CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from layerprune.data.task_data import BUNDLED_TASKS, PAPER_TASKS, read_task_rows, task_data_path
from layerprune.errors import LayerpruneError
from layerprune.evaluation import custom
from layerprune.evaluation.checksums import sha256_uncompressed
from layerprune.evaluation.humaneval import data_record

DATA_SOURCES = ("bundled", "hub")


def tasks_dir() -> Path:
    """resources/tasks: the lm-eval include_path of the bundled tasks."""
    return Path(str(files("layerprune").joinpath("resources", "tasks")))


def _cmmlu_upstream_row(row: dict) -> dict:
    # The stock CMMLU template reads the upstream CSV columns; give it exactly those.
    a, b, c, d = row["choices"]
    return {"Question": row["question"], "A": a, "B": b, "C": c, "D": d, "Answer": "ABCD"[row["answer"]]}


_ROW_ADAPTERS = {"cmmlu.jsonl.gz": _cmmlu_upstream_row}


def load_bundled(task_file: str, split: str = "test", subject: str | None = None, **_metadata: Any):
    """lm-eval `custom_dataset` hook: a DatasetDict {split: rows} from a bundled task file.

    lm-eval also passes the task's metadata (version, config_source) as keyword arguments; they are ignored.
    """
    import datasets

    data_file = task_file if task_file.endswith(".jsonl.gz") else f"{task_file}.jsonl.gz"
    rows = read_task_rows(data_file)
    if subject is not None:
        rows = tuple(r for r in rows if r.get("subject") == subject)
        if not rows:
            raise ValueError(f"no rows with subject {subject!r} in bundled {data_file}")
    adapt = _ROW_ADAPTERS.get(data_file)
    records = [adapt(r) for r in rows] if adapt else [dict(r) for r in rows]
    return datasets.DatasetDict({split: datasets.Dataset.from_list(records)})


def expand_task_names(text: str) -> list[str]:
    """'paper' / comma list -> entries (bundled names and paths), duplicates removed, order kept."""
    entries: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        if not part or part.lower() == "none":
            continue
        for name in PAPER_TASKS if part == "paper" else [part]:
            if name not in entries:
                entries.append(name)
    return entries


def lm_eval_task_name(name: str, data_source: str) -> str:
    if data_source not in DATA_SOURCES:
        raise LayerpruneError(f"unknown --data-source {data_source!r}; choose bundled or hub")
    task = BUNDLED_TASKS[name]
    return task.local_task if data_source == "bundled" else task.hub_task


def bundled_data_record(name: str) -> dict:
    """Which file a bundled task scores, with its sha256 (uncompressed, as in MANIFEST.md)."""
    task = BUNDLED_TASKS[name]
    path = task_data_path(task.data_file)
    return {
        "file": f"resources/data/tasks/{task.data_file}",
        "split": task.split,
        "sha256": sha256_uncompressed(str(path)),
        **({"licence_note": "CC BY-NC-SA 4.0, non-commercial use only"} if task.non_commercial else {}),
    }


@dataclass(frozen=True)
class TaskEntry:
    """One requested task, resolved and checked before any model loads."""

    name: str  # key in eval.json: a bundled name, a YAML's task/group name, or the JSONL task name
    lm_eval_name: str  # the task/group name lm-eval runs
    kind: str  # "bundled" | "hub" | "yaml" | "jsonl" | "humaneval" (not lm-eval: evaluation/humaneval.py)
    data: dict  # what data it scores: file + sha256, or the hub task
    include_dir: str | None = None  # a folder lm-eval must index (user YAMLs)
    generated_yaml: str | None = None  # the task YAML layerprune wrote (JSONL tasks)


def resolve_tasks(text: str, data_source: str = "bundled") -> list[TaskEntry]:
    """`piqa,hellaswag` / `paper` / paths to .yaml or .jsonl files -> checked TaskEntry list."""
    lm_eval_task_name("piqa", data_source)  # checks data_source
    entries: list[TaskEntry] = []
    for item in expand_task_names(text):
        if item == "humaneval":  # code generation, executed: opt-in only, never part of 'paper'

            entries.append(TaskEntry(item, item, "humaneval", data_record()))
            continue
        if item in BUNDLED_TASKS:
            task = BUNDLED_TASKS[item]
            data = bundled_data_record(item) if data_source == "bundled" else {"hub_task": task.hub_task}
            entries.append(TaskEntry(item, lm_eval_task_name(item, data_source), data_source, data))
            continue
        path = Path(item).expanduser()
        if not custom.looks_like_path(item):
            known = ", ".join(BUNDLED_TASKS)
            raise LayerpruneError(
                f"unknown task {item!r}; choose from {known}, 'paper', humaneval (executes generated code), "
                "or a path to a task .yaml or .jsonl file"
            )
        if path.is_dir():
            raise LayerpruneError(f"task {item} is a folder; give a task .yaml or .jsonl file")
        if not path.is_file():
            raise LayerpruneError(f"task file not found: {item}")
        digest = sha256_uncompressed(str(path))
        if item.endswith(custom.YAML_SUFFIXES):
            name = custom.check_task_yaml(path)
            data = {"file": str(path.resolve()), "sha256": digest}
            entries.append(TaskEntry(name, name, "yaml", data, include_dir=str(path.resolve().parent)))
        elif item.endswith(custom.JSONL_SUFFIXES):
            items = custom.read_mc_items(path)
            name = custom.custom_task_name(path)
            data = {"file": str(path.resolve()), "sha256": digest, "items": len(items)}
            yaml_text = custom.custom_task_yaml(path, name, digest)
            entries.append(TaskEntry(name, name, "jsonl", data, generated_yaml=yaml_text))
        else:
            raise LayerpruneError(f"task file {item} must be an lm-eval task .yaml or a multiple-choice .jsonl")
    names = [e.lm_eval_name for e in entries]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise LayerpruneError(f"the same task is requested twice: {', '.join(twice)}")
    return entries
