"""`responses: teacher`: the instruction examples the steps read are answered by the teacher (greedy), the
training rows carry exactly those answers, a second preparation reads them from the cache, and what
cannot work is one clear error."""

import copy
import json

import pytest

import layerprune.evaluation.instruction_following as follow
from layerprune import LayerpruneError, remove_layers
from layerprune.finetune.budget import less_budget
from layerprune.finetune.stage import prepare_training_rows
from layerprune.data.instructions import Example
from layerprune.models.tokens import IGNORE_INDEX
from layerprune.models.responses import greedy_responses
from layerprune.data.instructions import prompt_ids
from layerprune.finetune.config import HealConfig
from layerprune.finetune.teacher_first import examples_answered, examples_needed
from tiny_models import CORPUS, tiny_model, tiny_tokenizer

WORDS = ["cat", "dog", "owl", "sun", "sea", "fig", "elm", "ant", "bee", "cow"]


@pytest.fixture
def data(tmp_path, monkeypatch):
    """An instruction file of 10 prompts and a text file; the layerprune cache in tmp_path."""
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"say {w}", "context": "", "response": f"{w} {w}"}) + "\n"
                            for w in WORDS))
    (tmp_path / "text.txt").write_text(CORPUS)
    return tmp_path


class Loader:
    """load_teacher(): a tiny llama, counting the loads."""

    def __init__(self):
        self.teacher, self.loads = tiny_model("llama").eval(), 0

    def __call__(self):
        self.loads += 1
        return self.teacher


def labelled_text(row, tokenizer) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX])


def test_the_rows_carry_the_teachers_greedy_responses_to_the_prompts_the_steps_read(data, monkeypatch):
    tokenizer, loader = tiny_tokenizer(), Loader()
    config = HealConfig(method="distill", data=str(data / "sft.jsonl"), responses="teacher", response_tokens=6,
                        max_steps=2, batch_size=2, max_length=128, bf16=False)
    rows, info = prepare_training_rows(config, tokenizer, load_teacher=loader, log=lambda m: None)
    assert examples_needed(config) == 5 == len(rows) < len(WORDS)  # 2 steps x 2 rows (+ 1 spare)
    assert info["responses"].startswith("the teacher's")
    for row in rows:
        prompt = [t for t, label in zip(row["input_ids"], row["labels"]) if label == IGNORE_INDEX]
        word = next(w for w in WORDS if f"say {w}" in tokenizer.decode(prompt))
        assert prompt == prompt_ids(tokenizer, Example(f"say {word}", "", ""))
        by_hand = greedy_responses(loader.teacher, tokenizer, [prompt], new_tokens=6)[0]
        expected = tokenizer.decode(by_hand, skip_special_tokens=True).strip()
        assert labelled_text(row, tokenizer).startswith(expected)
        assert not any(f"{w} {w}" in labelled_text(row, tokenizer) for w in WORDS)  # not the data's answers

    calls = []
    monkeypatch.setattr(follow, "greedy_responses", lambda *a, **k: calls.append(1))
    again, _ = prepare_training_rows(config, tokenizer, load_teacher=loader, log=lambda m: None)
    assert again == rows and not calls  # from the cache


def test_a_mix_has_the_teacher_answer_only_its_instruction_share(data):
    tokenizer, loader = tiny_tokenizer(), Loader()
    config = HealConfig(method="distill", data=f"{data / 'text.txt'}:1+{data / 'sft.jsonl'}:1", responses="teacher",
                        response_tokens=4, max_steps=2, batch_size=2, max_length=32, bf16=False)
    rows, info = prepare_training_rows(config, tokenizer, load_teacher=loader, log=lambda m: None)
    text, answered = info["parts"]
    assert text["kind"] == "raw text" and "responses" not in text
    assert answered["examples"] == examples_needed(config, 0.5) == 3 == examples_answered(config)
    plain, _ = prepare_training_rows(config.model_copy(update={"responses": "data"}), tokenizer)
    text_rows = [r for r in rows if IGNORE_INDEX not in r["labels"]]
    assert text_rows == [r for r in plain if IGNORE_INDEX not in r["labels"]][:len(text_rows)]
    assert len(rows) >= 2 * 2  # the rows the 2 steps read are all there


def test_what_cannot_work_is_one_clear_error(data, tmp_path):
    tokenizer = tiny_tokenizer()
    with pytest.raises(LayerpruneError, match="needs a teacher"):
        prepare_training_rows(HealConfig(data=str(data / "sft.jsonl"), responses="teacher"), tokenizer)
    with pytest.raises(LayerpruneError, match="general text"):
        prepare_training_rows(HealConfig(data=str(data / "text.txt"), responses="teacher", max_length=32), tokenizer,
                              load_teacher=Loader())
    with pytest.raises(ValueError, match="response_tokens needs responses: teacher"):
        HealConfig(response_tokens=10)
    budget = HealConfig(max_minutes=2)
    assert less_budget(budget, 30).max_minutes == pytest.approx(1.5)
    with pytest.raises(LayerpruneError, match="whole max_minutes budget"):
        less_budget(budget, 130)


@pytest.mark.parametrize("method", ["distill", "full"])  # full: the teacher only answers, training is plain
def test_finetune_trains_on_the_teachers_responses(data, tmp_path, method):
    from layerprune import save_model
    from layerprune.api import finetune_model

    teacher = tiny_model("llama")
    save_model(teacher, tiny_tokenizer(), tmp_path / "teacher")
    pruned = remove_layers(copy.deepcopy(teacher), [1], how={"chosen_by": "test"})
    save_model(pruned, tiny_tokenizer(), tmp_path / "pruned")
    finetune_model(str(tmp_path / "pruned"), out=str(tmp_path / "healed"), teacher=str(tmp_path / "teacher"),
                   method=method, data=str(data / "sft.jsonl"), responses="teacher", response_tokens=4,
                   max_steps=2, max_minutes=5, batch_size=2, max_length=64, bf16=False, warmup_steps=0)
    record = json.loads((tmp_path / "healed" / "heal.json").read_text())
    assert record["steps"] == 2 and record["data"]["responses"].startswith("the teacher's")
    assert record["data"]["examples"] == 5
    assert record["config"]["max_minutes"] == 5  # the user's budget; the time answering took came out of it
    assert record["notes"]["time_budget"]["minutes"] < 5


def test_prompts_that_leave_no_room_for_a_response_are_not_answered():
    from layerprune.finetune.stage import _fitting_prompts

    tokenizer = tiny_tokenizer()
    examples = [Example("say cat", "", "cat"), Example("say dog", "x" * 200, "dog"), Example("say owl", "", "owl"),
                Example("say sun", "", "sun")]
    config = HealConfig(max_length=64)
    assert len(prompt_ids(tokenizer, examples[1])) >= 64 > len(prompt_ids(tokenizer, examples[0]))
    assert [e.instruction for e in _fitting_prompts(examples, tokenizer, config, 2)] == ["say cat", "say owl"]
    assert len(_fitting_prompts(examples, tokenizer, config, None)) == 3
