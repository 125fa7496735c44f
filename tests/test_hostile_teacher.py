"""A teacher is checked against its student before any work (docs/safety.md): a tokenizer that maps ids
differently (same vocabulary size) and, where a method compares hidden states, another hidden size are one
line each, and nothing is written."""

import pytest
from typer.testing import CliRunner

from layerprune import save_model
from layerprune.cli import app
from cli_asserts import assert_one_line_error
from test_pipeline import make_workspace
from tiny_models import tiny_model, tiny_tokenizer

runner = CliRunner()


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    return make_workspace(tmp_path)


def swapped_tokenizer():
    """tiny_tokenizer with the ids of 'a' and 'b' exchanged: the same size, another mapping."""
    from tokenizers import Tokenizer

    tokenizer = tiny_tokenizer()
    state = tokenizer.backend_tokenizer.to_str()
    vocab = tokenizer.get_vocab()
    a, b = vocab["a"], vocab["b"]
    state = state.replace(f'"a":{a}', '"a":@').replace(f'"b":{b}', f'"b":{a}').replace('"a":@', f'"a":{b}')
    from transformers import PreTrainedTokenizerFast

    swapped = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(state), pad_token="<pad>", bos_token="<s>",
                                      eos_token="</s>", unk_token="<unk>")
    swapped.chat_template = tokenizer.chat_template
    assert swapped.get_vocab()["a"] == b and len(swapped) == len(tokenizer)
    return swapped


def finetune(workspace, teacher, method, *extra):
    return runner.invoke(app, ["finetune", str(workspace / "tiny"), "--out", str(workspace / "healed"), "--teacher",
                               str(teacher), "--method", method, "--data", "c4", "--max-steps", "1",
                               "--max-length", "16", "--max-samples", "2", *extra])


@pytest.mark.parametrize("method", ["distill", "replace"])
def test_a_teacher_with_another_token_mapping_is_refused(workspace, method):
    save_model(tiny_model("llama"), swapped_tokenizer(), workspace / "teacher")
    result = finetune(workspace, workspace / "teacher", method)
    assert_one_line_error(result, "has another tokenizer than the model: token 'a' is id")
    assert not (workspace / "healed").exists() and not (workspace / "healed.checkpoints").exists()


def test_a_teacher_of_another_hidden_size_is_refused_where_hidden_states_are_compared(workspace):
    save_model(tiny_model("llama", hidden_size=48), tiny_tokenizer(), workspace / "teacher")
    result = finetune(workspace, workspace / "teacher", "block-local")
    assert_one_line_error(result, "has hidden size 48 and the model 32")
    assert not (workspace / "healed").exists() and not (workspace / "healed.checkpoints").exists()


def test_the_same_tokenizer_and_size_still_teach(workspace):
    save_model(tiny_model("llama", seed=1), tiny_tokenizer(), workspace / "teacher")
    result = finetune(workspace, workspace / "teacher", "distill")
    assert result.exit_code == 0, result.output


def test_a_hand_edited_responses_cache_is_answered_again_not_trained_on(tmp_path, monkeypatch):
    import json

    import layerprune.finetune.teacher_responses as teacher_responses
    from layerprune.finetune.config import HealConfig
    from layerprune.finetune.stage import prepare_training_rows

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "sft.jsonl").write_text("".join(json.dumps({"instruction": f"say {w}", "context": "",
                                                            "response": f"{w} {w}"}) + "\n" for w in ("cat", "dog")))
    teacher, calls = tiny_model("llama").eval(), []
    real = teacher_responses.greedy_responses
    monkeypatch.setattr(teacher_responses, "greedy_responses", lambda *a, **k: calls.append(1) or real(*a, **k))
    config = HealConfig(method="distill", data=str(tmp_path / "sft.jsonl"), responses="teacher", response_tokens=4,
                        max_steps=1, batch_size=2, max_length=64, bf16=False)

    def rows():
        return prepare_training_rows(config, tiny_tokenizer(), load_teacher=lambda: teacher, log=lambda m: None)[0]

    first = rows()
    assert rows() == first and len(calls) == 1  # the second time from the cache
    (path,) = (tmp_path / "cache" / "responses").rglob("*.json")
    record = json.loads(path.read_text())
    record["responses"][0] = [7, 7, 7]  # edited by hand: the digest no longer matches
    path.write_text(json.dumps(record))
    assert rows() == first and len(calls) == 2  # answered again, never trained on the edit
    path.write_text(json.dumps(record["responses"]))  # the old layout, a bare list: answered again too
    assert rows() == first and len(calls) == 3
