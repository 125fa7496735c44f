"""The run planner is pure: RunConfig -> stages, with one settings key per stage (ledger and study cache)."""

from layerprune.config import RunConfig
from layerprune.runs.planner import plan_stages, work_dir_name

HEAL = {"method": "partial", "data": "sft.jsonl", "max_steps": 3}


def config(**overrides) -> RunConfig:
    base = {"model": "tiny", "out": "run", "prune": {"metric": "block-influence", "num_layers": 2},
            "heal": [HEAL, {**HEAL, "method": "lora"}], "eval": {"tasks": "none", "ppl": "text.txt"}}
    return RunConfig.model_validate({**base, **overrides})


def by_name(c: RunConfig) -> dict:
    return {stage.name: stage for stage in plan_stages(c)}


def test_stages_come_in_run_order_with_their_step_function():
    stages = plan_stages(config())
    assert [(s.name, s.step, s.number) for s in stages] == [
        ("eval-original", "evaluate", 0), ("prune", "prune", 0), ("eval-pruned", "evaluate", 0),
        ("healed-1", "heal", 1), ("healed-2", "heal", 2), ("eval-final", "evaluate", 0), ("report", "report", 0)]
    healed = by_name(config())["healed-1"]
    assert healed.outputs == ("healed-1", work_dir_name("healed-1", healed.settings))


def test_iterative_runs_one_rounds_stage_instead_of_prune_and_heal():
    stages = plan_stages(config(prune={"metric": "reverse-order", "strategy": "iterative", "schedule": "1:1:2"}))
    assert [s.name for s in stages] == ["eval-original", "rounds", "eval-final", "report"]


def test_a_setting_changes_the_key_of_its_stage_and_every_stage_after_it_only():
    before = by_name(config())
    after = by_name(config(heal=[{**HEAL, "learning_rate": 5e-3}, {**HEAL, "method": "lora"}]))
    changed = {name for name in before if before[name].digest != after[name].digest}
    assert changed == {"healed-1", "healed-2", "eval-final", "report"}
    # the work folder of an interrupted heal is named by the new key, so it cannot be resumed
    assert before["healed-1"].outputs[1] != after["healed-1"].outputs[1]


def test_planning_is_deterministic():
    assert [s.digest for s in plan_stages(config())] == [s.digest for s in plan_stages(config())]


def test_task_tokens_counts_each_tasks_documents_at_its_own_length():
    from layerprune.planning.estimate import TASK_TOKENS, TOKENS_PER_DOCUMENT, task_tokens

    # ARC-e's short documents at their measured length, MMLU's 57 subtasks at the paper mix's
    assert task_tokens("arc_easy,mmlu", 5) == 5 * TASK_TOKENS["arc_easy"] + 5 * 57 * TOKENS_PER_DOCUMENT
    assert task_tokens("piqa", 0) == 1838 * TASK_TOKENS["piqa"]  # limit 0: every document
    assert task_tokens("my-task.yaml", 5) is None  # a size not known before it loads
