"""How a pruning record's choices read in words (model cards, reports, logs): objectives and quality targets."""

from __future__ import annotations

from dataclasses import dataclass

from layerprune.errors import LayerpruneError


@dataclass(frozen=True)
class Objective:
    name: str  # select_objective
    measure: str  # the DropSetLosses measure: nll | kl
    label: str  # in log lines and reports


OBJECTIVES: dict[str, Objective] = {o.name: o for o in [
    Objective("loss", "nll", "validation loss"),
    Objective("kl", "kl", "KL to the unpruned model"),
    Objective("tasks", "nll", "answer loss"),
]}


def get_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise LayerpruneError(f"unknown select_objective {name!r}; choose {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def objective_label(name: str | None) -> str:
    """How a record's objective reads in reports (a record without one: the validation loss)."""
    return OBJECTIVES[name].label if name in OBJECTIVES else OBJECTIVES["loss"].label


def describe_quality_target(record: dict) -> str | None:
    """The quality target a selection record's constraints or a history entry name, in words (None: none)."""
    if record.get("max_loss_increase") is not None:
        return f"validation loss at most {record['max_loss_increase']:g} nats above the unpruned model's"
    if record.get("max_ppl_ratio") is not None:
        return f"validation perplexity at most {record['max_ppl_ratio']:g}x the unpruned model's"
    return None
