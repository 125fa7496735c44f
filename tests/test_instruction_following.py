"""Instruction following against the unpruned model: response KL and greedy agreement equal hand
computations on tiny models; the reserved Dolly slice never reaches training."""

import copy
import json

import pytest
import torch

import layerprune.evaluation.instruction_following as follow
from layerprune import remove_layers, save_model
from layerprune.data.instructions import Example, dolly_records, dolly_split, load_examples, tokenize_examples
from layerprune.evaluation.instruction_following import (
    agreement,
    common_prefix,
    instruction_following,
    lcs_length,
    response_kl,
    rouge_l,
)
from layerprune.models.responses import greedy_responses
from layerprune.data.instructions import prompt_ids
from tiny_models import tiny_model, tiny_tokenizer

EXAMPLES = [Example("name a color", "", "red"), Example("add", "2 and 3", "five"),
            Example("say hi", "", "hello there"), Example("count", "to three", "one two three"),
            Example("a fruit?", "", "apple")]


@pytest.fixture(autouse=True)
def short_examples(monkeypatch):
    """Short synthetic held-out examples: the tiny models read 128 positions at most."""
    monkeypatch.setattr(follow, "heldout_examples", lambda n: EXAMPLES[:n])


def test_the_reserved_dolly_slice_never_reaches_training():
    training, reserved = dolly_split(dolly_records())
    assert len(reserved) == 500  # every 30th of 15,011
    reserved_prompts = {(r["instruction"], r["context"]) for r in reserved}
    assert not any((r["instruction"], r["context"]) in reserved_prompts for r in training)
    assert len(training) + len(reserved) <= 15011 and len(training) > 14400
    assert [e.instruction for e in load_examples("dolly")] == [r["instruction"] for r in training]
    assert [e.instruction for e in load_examples("dolly-heldout")] == [r["instruction"] for r in reserved]


def test_response_kl_equals_a_hand_computation():
    tokenizer = tiny_tokenizer()
    reference = tiny_model("llama").eval()
    model = remove_layers(copy.deepcopy(reference), [1, 2, 3], how={"chosen_by": "test"}).eval()
    rows = tokenize_examples(EXAMPLES, tokenizer, max_length=100)
    expected, tokens = 0.0, 0
    with torch.no_grad():
        for row in rows:  # one row at a time, no padding: the plain definition
            ids = torch.tensor([row["input_ids"]])
            keep = torch.tensor(row["labels"][1:]) != -100
            log_p = torch.log_softmax(reference(input_ids=ids).logits[0, :-1][keep].float(), -1)
            log_q = torch.log_softmax(model(input_ids=ids).logits[0, :-1][keep].float(), -1)
            expected += float((log_p.exp() * (log_p - log_q)).sum())
            tokens += int(keep.sum())
    measured = response_kl(model, reference, rows, pad_id=0, batch_size=3)  # padded batches
    assert measured["tokens"] == tokens
    assert measured["kl"] == pytest.approx(expected / tokens, rel=1e-4) and measured["kl"] > 1e-3
    assert response_kl(reference, reference, rows, pad_id=0)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_agreement_measures_equal_hand_computations():
    assert lcs_length([1, 2, 3, 4], [1, 3, 4, 5]) == 3
    assert rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)  # P = R = 3/4
    assert rouge_l([1, 2], [1, 2, 3, 4]) == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert rouge_l([], []) == 1.0 and rouge_l([7], [8]) == 0.0 and rouge_l([], [1]) == 0.0
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2
    measured = agreement([[1, 2, 3, 4], [9]], [[1, 3, 4, 5], [9]])
    assert measured == {"rouge_l": pytest.approx((0.75 + 1) / 2), "prefix_tokens": 1.0, "identical": 0.5,
                        "prompts": 2}


def test_batched_greedy_responses_equal_one_prompt_at_a_time():
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama").eval()
    prompts = [prompt_ids(tokenizer, e) for e in EXAMPLES]
    assert len({len(p) for p in prompts}) > 1  # different lengths: left padding matters
    batched = greedy_responses(model, tokenizer, prompts, new_tokens=8, batch_size=5)
    alone = [greedy_responses(model, tokenizer, [p], new_tokens=8, batch_size=1)[0] for p in prompts]
    assert batched == alone and all(len(r) <= 8 for r in batched)


def test_instruction_following_of_the_reference_and_of_a_pruned_copy(tmp_path):
    tokenizer = tiny_tokenizer()
    reference = tiny_model("llama").eval()
    same = instruction_following(copy.deepcopy(reference), reference, tokenizer, prompts=5, new_tokens=6,
                                 cache_dir=tmp_path)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6) and same["rouge_l"] == 1.0 and same["identical"] == 1.0
    itself = instruction_following(reference, None, tokenizer, prompts=5, new_tokens=6)
    assert itself["kl"] == 0.0 and itself["reference"] == "itself" and itself["tokens"] == same["tokens"]
    pruned = remove_layers(copy.deepcopy(reference), [1, 2, 3], how={"chosen_by": "test"}).eval()
    measured = instruction_following(pruned, reference, tokenizer, prompts=5, new_tokens=6, cache_dir=tmp_path)
    assert measured["kl"] > 1e-3 and measured["rouge_l"] < 1.0 and measured["prompts"] == 5
    assert len(list(tmp_path.glob("responses-*.json"))) == 1  # the reference generated once, then cached


def test_eval_cli_compares_a_pruned_model_with_the_model_it_was_pruned_from(tmp_path):
    import json

    from typer.testing import CliRunner

    from layerprune.api import prune_model
    from layerprune.cli import app

    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "original")
    prune_model(str(tmp_path / "original"), out=str(tmp_path / "pruned"), drop=[1, 2])
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "pruned"), "--out", str(tmp_path / "eval"),
                                      "--tasks", "none", "--ppl", "none", "--follow", "4",
                                      "--follow-new-tokens", "5", "--no-samples"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "eval" / "eval.json").read_text())["instruction_following"]
    assert record["reference"].endswith("original") and record["kl"] > 0 and record["prompts"] == 4
    assert "Instruction following" in (tmp_path / "eval" / "eval.md").read_text()


@pytest.mark.integration
def test_a_run_reports_what_healing_gave_back_per_measure(tmp_path):
    """eval-pruned and eval-final compare with the run's original; report.md has the gap-closed table."""
    from test_pipeline import make_workspace, write_config

    from layerprune.config import load_run_config
    from layerprune.runs.pipeline import run_pipeline

    workspace = make_workspace(tmp_path)
    evaluation = {"tasks": "none", "ppl": str(workspace / "text.txt"), "seq_len": 32, "ppl_windows": 4,
                  "samples": False, "follow": 3, "follow_new_tokens": 4}
    summary = run_pipeline(load_run_config(write_config(workspace, eval=evaluation, bench=None)), log=lambda m: None)
    records = {name: json.loads((workspace / "run" / name / "eval.json").read_text())["instruction_following"]
               for name in ("eval-original", "eval-pruned", "eval-final")}
    assert records["eval-original"]["reference"] == "itself" and records["eval-pruned"]["kl"] > 0
    assert records["eval-final"]["reference"] == records["eval-pruned"]["reference"] != "itself"
    pruned, final = records["eval-pruned"]["kl"], records["eval-final"]["kl"]
    assert summary["gap_closed"]["measures"]["instruction KL"] == pytest.approx((final - pruned) / (0 - pruned))
    report = (workspace / "run" / "report.md").read_text()
    assert "| instruction KL | 0.0000 |" in report and "gap closed" in report


def test_the_time_plan_counts_instruction_following_once_per_comparison(tmp_path):
    """An evaluation's estimate adds the KL rows through both models and the greedy responses (the
    reference's only until they are cached); a run's eval-original compares the original with itself (no
    work), its first comparison generates the original's responses, the next reads them."""
    from test_pipeline import make_workspace, write_config

    from layerprune.config import load_run_config
    from layerprune.evaluation.config import EvalConfig
    from layerprune.planning.estimate import FOLLOW_ROW_TOKENS, eval_seconds
    from layerprune.hardware.speed import GENERATED_TOKEN_COST, Speed
    from layerprune.planning.run_time import plan_run
    from layerprune.runs.planner import plan_stages

    model, reference = Speed(forward=1e-3, decode=1e-2), Speed(forward=2e-3, decode=2e-2)
    config = EvalConfig(tasks="none", ppl="none", samples=False, follow=10, follow_new_tokens=4)
    kl = 10 * FOLLOW_ROW_TOKENS * (1e-3 + 2e-3)
    generated = 10 * 4 * GENERATED_TOKEN_COST
    assert eval_seconds(config, model, reference=reference) == pytest.approx(kl + generated * (1e-3 + 2e-3))
    assert eval_seconds(config, model, reference=reference, reference_cached=True) == pytest.approx(
        kl + generated * 1e-3)

    workspace = make_workspace(tmp_path)
    evaluation = {"tasks": "none", "ppl": str(workspace / "text.txt"), "seq_len": 32, "ppl_windows": 4,
                  "samples": False}
    runs = [load_run_config(write_config(workspace, eval={**evaluation, "follow": follow_n}))
            for follow_n in (0, 10)]
    stages = [{s.name: s.estimate for s in plan_run(run, plan_stages(run), workspace / "run", tiny_model("llama"),
                                                     model, model, set()).stages} for run in runs]
    assert stages[1]["eval-original"] == stages[0]["eval-original"]
    first, second = (stages[1][n] - stages[0][n] for n in ("eval-pruned", "eval-final"))
    assert first > second > 0
