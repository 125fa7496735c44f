"""The bundled zero-shot task data (offline copies, resources/data/tasks): which file holds which task."""

from __future__ import annotations

import functools
import gzip
import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path


@dataclass(frozen=True)
class BundledTask:
    name: str  # what users type: piqa
    local_task: str  # lm-eval task/group name in resources/tasks: lp_piqa
    hub_task: str  # lm-eval's stock task/group name (data from the hub): piqa
    data_file: str  # under resources/data/tasks/
    split: str  # the split the bundled file holds (the one the stock task scores)
    title: str  # column header in tables
    non_commercial: bool = False


BUNDLED_TASKS: dict[str, BundledTask] = {
    t.name: t
    for t in [
        BundledTask("piqa", "lp_piqa", "piqa", "piqa.jsonl.gz", "validation", "PIQA"),
        BundledTask("hellaswag", "lp_hellaswag", "hellaswag", "hellaswag.jsonl.gz", "validation", "HellaSwag"),
        BundledTask("openbookqa", "lp_openbookqa", "openbookqa", "openbookqa.jsonl.gz", "test", "OpenbookQA"),
        BundledTask("arc_easy", "lp_arc_easy", "arc_easy", "arc_easy.jsonl.gz", "test", "ARC-e"),
        BundledTask("arc_challenge", "lp_arc_challenge", "arc_challenge", "arc_challenge.jsonl.gz", "test", "ARC-c"),
        BundledTask("mmlu", "lp_mmlu", "mmlu", "mmlu.jsonl.gz", "test", "MMLU"),
        BundledTask("cmmlu", "lp_cmmlu", "cmmlu", "cmmlu.jsonl.gz", "test", "CMMLU", non_commercial=True),
        BundledTask("winogrande", "lp_winogrande", "winogrande", "winogrande.jsonl.gz", "validation", "WinoGrande"),
    ]
}


# Table 1 columns of Reassessing Layer Pruning (arXiv 2411.15558), in its order
# (section 3.2: 8 zero-shot tasks via lm-eval).
PAPER_TASKS: tuple[str, ...] = (
    "piqa", "hellaswag", "openbookqa", "arc_easy", "arc_challenge", "mmlu", "cmmlu", "winogrande",
)


def task_data_path(data_file: str) -> Path:
    return Path(str(files("layerprune").joinpath("resources", "data", "tasks", data_file)))


@functools.lru_cache(maxsize=16)
def read_task_rows(data_file: str) -> tuple[dict, ...]:
    """All rows of a bundled task file (cached: MMLU's 57 subtasks share one file)."""
    with gzip.open(task_data_path(data_file), "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())
