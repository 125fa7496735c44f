"""What select auto, select search and the trade-off curve minimize over drop-sets (`select_objective`).

"Rethinking Layer Redundancy in Large Language Models: Calibration Objectives and Search for Depth Pruning"
(arXiv 2604.24938) finds that this objective matters more than the search algorithm. Each objective is one
DropSetLosses measure on one validation set:

- loss (default): next-token cross-entropy on held-out calibration text;
- kl: mean KL(p_unpruned || p_pruned) of the next-token distributions on that text (0 for the unpruned
  model): how far the pruned model's predictions move, whatever the text's own tokens;
- tasks: cross-entropy of the gold answers of a multiple-choice mix (data/task_answers.py: ARC-Easy,
  PIQA, HellaSwag documents that evaluation does not read), given their questions.
"""

from __future__ import annotations

import math
from typing import Callable

from layerprune.data.task_answers import task_answers
from layerprune.models.provenance_labels import objective_label


def objective_validation(config, tokenizer, held_out_text: Callable) -> Callable:
    """A zero-argument callable giving the data the config's objective judges drop-sets on: the held-out
    calibration text (`held_out_text()`) for loss and kl, the task answers for tasks. Read only when called."""
    if config.select_objective != "tasks":
        return held_out_text

    def answers():
        return task_answers(tokenizer, config.select_tasks_docs)

    return answers


def objective_record(name: str, value: float, unpruned: float, data: dict) -> dict:
    """What a selection record says of its objective; the loss objective also keeps the field names that
    records had before objectives existed (loss, unpruned_loss, ppl_ratio)."""
    record = {"data": data, "objective": name, "value": value, "unpruned": unpruned}
    if name == "loss":
        record.update(loss=value, unpruned_loss=unpruned, ppl_ratio=math.exp(value - unpruned))
    return record


def describe_value(name: str, value: float, unpruned: float) -> str:
    """A log line's account of a drop-set's objective value."""
    if name == "kl":
        return f"KL to the unpruned model {value:.4f} nats"
    return f"{objective_label(name)} {value:.4f} (unpruned {unpruned:.4f})"
