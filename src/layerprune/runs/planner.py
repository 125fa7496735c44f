"""The stages a RunConfig runs, from the config alone (no model, no files): pure functions.

Each Stage carries everything its output depends on (`settings`). That one dict is the key of the stage
ledger (stages.json: a rerun keeps an output only when it was made with equal settings) and of a study's
shared cache (equal work in several settings is done once), so the two can never disagree.
"""

from __future__ import annotations

from layerprune.config import RunConfig
from layerprune.runs.stages import Stage, settings_digest

PRUNE_OUTPUTS = ("scores.json", "selection.json", "pruned", "scores.png", "angular.png")
REPORT_OUTPUTS = ("report.md", "run.json", "loss_curves.png", "layer_map.png")


def base_settings(config: RunConfig) -> dict:
    """What every stage's output depends on: the model, its dtype and the seed."""
    return {"model": config.model, "dtype": config.dtype, "seed": config.seed}


def prune_settings(config: RunConfig) -> dict:
    """What the pruned model depends on."""
    return {**base_settings(config), "prune": config.prune.model_dump(mode="json")}


def heal_settings(config: RunConfig, base: dict, number: int) -> dict:
    """What heal stage `number` (1-based) depends on: its input's settings (`base`) and heal stages 1..number."""
    return {**base, "heal": [stage.model_dump(mode="json") for stage in config.heal[:number]]}


def work_dir_name(output_name: str, settings: dict) -> str:
    """A heal stage's checkpoint folder: named by the digest of its settings, so an interrupted heal only
    ever resumes under the same settings."""
    return f".{output_name}.checkpoints-{settings_digest(settings)}"


def plan_stages(config: RunConfig) -> list[Stage]:
    """The stages `config` runs, in order, each with its step, settings and the names it writes."""
    c = config
    base = base_settings(c)
    pruned = prune_settings(c)
    final = heal_settings(c, pruned, len(c.heal))
    evaluation = c.eval.model_dump(mode="json", exclude={"original", "before_healing"}) if c.eval else None
    plan = []
    if c.eval and c.eval.original:
        plan.append(Stage("eval-original", {**base, "eval": evaluation}, ("eval-original",), step="evaluate"))
    if c.curve:
        plan.append(Stage("curve", {**base, "curve": c.curve.model_dump(mode="json")}, ("curve",), step="curve"))
    if c.prune.strategy == "iterative":
        plan.append(Stage("rounds", final, ("rounds",), step="rounds"))
    else:
        plan.append(Stage("prune", pruned, PRUNE_OUTPUTS, step="prune"))
        if c.eval and c.eval.before_healing and c.heal:
            plan.append(Stage("eval-pruned", {**pruned, "eval": evaluation}, ("eval-pruned",), step="evaluate"))
        for number in range(1, len(c.heal) + 1):
            settings = heal_settings(c, pruned, number)
            name = f"healed-{number}"
            plan.append(Stage(name, settings, (name, work_dir_name(name, settings)), step="heal", number=number))
    if c.eval:
        plan.append(Stage("eval-final", {**final, "eval": evaluation}, ("eval-final",), step="evaluate"))
    if c.bench:
        plan.append(Stage("bench", {**final, "bench": c.bench.model_dump(mode="json")}, ("bench",), step="bench"))
    plan.append(Stage("report", c.model_dump(mode="json", exclude={"out"}), REPORT_OUTPUTS, step="report"))
    return plan


def run_inputs(config: RunConfig) -> list:
    """The model and data a run reads (local paths among them must stay outside the run folder)."""
    c = config
    refs = [c.model, c.prune.calibration.source] + ([c.curve.calibration.source] if c.curve else [])
    refs += [ref for stage in c.heal for ref in (stage.data, stage.teacher)]
    if c.eval:
        refs += [c.eval.tasks, c.eval.ppl]
    return refs
