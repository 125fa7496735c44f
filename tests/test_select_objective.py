"""select_objective: what select auto / search (and the curve) minimize over drop-sets: loss | kl | tasks.

Every value is checked against a hand computation on a model with the layers really removed
(layerprune.remove_layers on a copy), not against the engine that resumes from cached states."""

from __future__ import annotations

import copy
import json
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from layerprune import remove_layers, save_model
from layerprune.cli import app
from layerprune.selection.config import CurveConfig, PruneConfig
from layerprune.common.config_base import as_config
from layerprune.data import task_answers
from layerprune.data.calibration import CalibrationData, calibration_from_texts
from layerprune.errors import LayerpruneError
from layerprune.data.task_data import BUNDLED_TASKS, read_task_rows
from layerprune.selection.drop_set_losses import DropSetLosses
from layerprune.selection.strategies import choose, in_memory_scores
from cli_asserts import assert_one_line_error
from numerics import approx_value
from tiny_models import CORPUS, tiny_input, tiny_model, tiny_tokenizer

IDENTITY, PERTURBED = 1, 3


def padded_data() -> CalibrationData:
    """Three rows of 12 tokens, the second right-padded after 7."""
    ids = tiny_input(batch=3, length=12, seed=4)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return CalibrationData(ids, mask)


@torch.no_grad()
def hand_kl(model, data: CalibrationData, drop) -> float:
    """Mean over the predicted tokens of KL(p_unpruned || p_pruned), the layers `drop` really removed."""
    pruned = remove_layers(copy.deepcopy(model), drop)
    ids, mask = data.input_ids, data.attention_mask
    p = F.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), dim=-1)
    q = F.log_softmax(pruned(input_ids=ids, attention_mask=mask).logits[:, :-1].double(), dim=-1)
    per_token = (p.exp() * (p - q)).sum(dim=-1)
    valid = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
    return float(per_token[valid].mean())


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # gemma2: the final logit soft-capping applies
def test_kl_equals_a_hand_computation_fresh_and_resumed_from_cached_states(family):
    model = tiny_model(family)
    if family == "gemma2":
        assert model.config.final_logit_softcapping
    data = padded_data()
    engine = DropSetLosses(model, data, batch_size=2, measure="kl")
    assert engine.intact_loss == 0.0
    fresh = engine.loss({3})  # resumes from the intact pass's state entering block 3
    assert fresh == approx_value(hand_kl(model, data, [3]))
    assert fresh > 1e-3

    engine.loss({1})  # keeps the states it computes: those entering blocks 2, 3 and 4 with block 1 gone
    before = engine.block_forwards
    resumed = engine.loss({1, 3})  # resumes from {1}'s state entering block 3 and runs block 4 only
    assert engine.block_forwards - before == len(engine.batches)  # one block per batch: the cache served the rest
    assert resumed == approx_value(hand_kl(model, data, [1, 3]))


def test_the_loss_measure_is_still_the_token_cross_entropy():
    model = tiny_model("llama")
    data = padded_data()
    engine = DropSetLosses(model, data, batch_size=2)
    pruned = remove_layers(copy.deepcopy(model), [2])
    with torch.no_grad():
        logits = pruned(input_ids=data.input_ids, attention_mask=data.attention_mask).logits[:, :-1]
    target = data.input_ids[:, 1:].masked_fill((data.attention_mask[:, 1:] == 0) | (data.attention_mask[:, :-1] == 0),
                                               -100)
    expected = F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100).item()
    assert engine.loss({2}) == approx_value(expected)


def identity_and_perturbed_model():
    """A tiny Llama whose layer IDENTITY is an exact identity (its residual branches output 0) and whose layer
    PERTURBED writes 20 times its usual output into the residual stream."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer, scale in ((model.model.layers[IDENTITY], 0.0), (model.model.layers[PERTURBED], 20.0)):
            layer.self_attn.o_proj.weight.mul_(scale)
            layer.mlp.down_proj.weight.mul_(scale)
    return model


def choose_with(model, validation, **fields) -> dict:
    config = PruneConfig(**fields)
    return choose(model, config, score=in_memory_scores(model, validation), validation=validation, log=lambda m: None)


def test_search_with_kl_drops_the_identity_and_keeps_the_layer_that_changes_the_output():
    model = identity_and_perturbed_model()
    data = padded_data()
    record = choose_with(model, data, select="search", select_objective="kl", num_layers=1)
    assert record["dropped"] == [IDENTITY]
    validation = record["validation"]
    assert validation["objective"] == "kl" and validation["unpruned"] == 0.0
    assert validation["value"] == pytest.approx(0.0, abs=1e-6)
    assert "loss" not in validation and "ppl_ratio" not in validation  # not a next-token loss
    candidates = {c["add"]: c["loss"] for c in record["search"]["path"][0]["candidates"]}
    assert max(candidates, key=candidates.get) == PERTURBED  # the most harmful layer to remove
    assert candidates[PERTURBED] == approx_value(hand_kl(model, data, [PERTURBED]))
    assert candidates[PERTURBED] > 3 * max(v for layer, v in candidates.items() if layer != PERTURBED)


def test_select_auto_with_kl_compares_the_candidates_by_kl():
    model = identity_and_perturbed_model()
    data = padded_data()
    record = choose_with(model, data, select="auto", select_objective="kl", num_layers=1,
                         metric=["reverse-order", "random"])
    expected = {name: hand_kl(model, data, c["dropped"]) for name, c in record["candidates"].items()}
    for name, c in record["candidates"].items():
        assert c["validation_loss"] == approx_value(expected[name])
    best = min(expected, key=expected.get)
    assert record["chosen_by"] == f"auto:{best}"
    assert record["validation"]["objective"] == "kl"
    assert record["validation"]["value"] == approx_value(expected[best])


def test_the_loss_objective_keeps_the_record_fields_older_readers_know():
    model = tiny_model("llama")
    data = padded_data()
    record = choose_with(model, data, select="search", num_layers=1)
    validation = record["validation"]
    assert validation["objective"] == "loss"
    assert validation["loss"] == validation["value"] == record["search"]["path"][0]["loss"]
    assert validation["unpruned_loss"] == validation["unpruned"] == DropSetLosses(model, data).intact_loss
    assert validation["ppl_ratio"] == pytest.approx(torch.tensor(validation["loss"] - validation["unpruned"]).exp())


# ---------------------------------------------------------------- tasks


SYNTHETIC = {  # one short document per task, in each bundled file's own fields
    "arc_easy": [{"question": "What is 2+2?", "choices": {"text": ["3", "4", "5"], "label": ["A", "B", "C"]},
                  "answerKey": "B"}],
    "piqa": [{"goal": "open a jar", "sol1": "twist the lid", "sol2": "eat the jar", "label": 0}],
    "hellaswag": [{"activity_label": "Cooking", "ctx_a": "A man cuts [header] onions.", "ctx_b": "he",
                   "endings": ["sings.", "then cries [title] a lot."], "label": "1"}],
}
# What lm-eval asks the model for each document's gold choice: (context, target delimiter " " + gold choice).
SYNTHETIC_PAIRS = [("Question: What is 2+2?\nAnswer:", " 4"),
                   ("Question: open a jar\nAnswer:", " twist the lid"),
                   ("Cooking: A man cuts onions. He", " then cries. a lot.")]


@torch.no_grad()
def hand_answer_loss(model, tokenizer, pairs, drop) -> float:
    """Mean NLL of the continuation's tokens given the context, one whole forward per document."""
    pruned = remove_layers(copy.deepcopy(model), drop) if drop else model
    total, count = 0.0, 0
    for context, continuation in pairs:
        n_context = len(tokenizer(context).input_ids)
        ids = torch.tensor([tokenizer(context + continuation).input_ids])
        logprobs = F.log_softmax(pruned(input_ids=ids).logits[0].double(), dim=-1)
        for t in range(n_context, ids.shape[1]):
            total -= float(logprobs[t - 1, ids[0, t]])
            count += 1
    return total / count


def test_the_tasks_objective_is_the_answer_loss_of_a_hand_computation(monkeypatch):
    monkeypatch.setattr(task_answers, "task_documents", lambda name, n: SYNTHETIC[name][:n])
    tokenizer = tiny_tokenizer()
    assert task_answers.gold_pairs(1) == SYNTHETIC_PAIRS
    data = task_answers.task_answers(tokenizer, 1)
    assert data.description["answer_tokens"] == sum(len(answer) for _, answer in SYNTHETIC_PAIRS)  # 1 char, 1 token
    model = tiny_model("llama")
    engine = DropSetLosses(model, data, batch_size=2)  # rows of unequal length: batches of 2 and 1
    assert engine.intact_loss == approx_value(hand_answer_loss(model, tokenizer, SYNTHETIC_PAIRS, []))
    assert engine.loss({2}) == approx_value(hand_answer_loss(model, tokenizer, SYNTHETIC_PAIRS, [2]))
    assert engine.loss({0, 2}) == approx_value(hand_answer_loss(model, tokenizer, SYNTHETIC_PAIRS, [0, 2]))


def test_pairs_are_encoded_as_lm_eval_encodes_them():
    from lm_eval.api.model import TemplateLM

    tokenizer = tiny_tokenizer(chat_template=False)
    lm = SimpleNamespace(backend="causal", tok_encode=lambda text: tokenizer(text).input_ids)
    for context, continuation in [("Question: a?\nAnswer:", " b"), ("ends in spaces  ", "x y")]:
        assert task_answers.encode_pair(tokenizer, context, continuation) == \
            TemplateLM._encode_pair(lm, context, continuation)


@pytest.fixture(scope="module")
def lm_eval_tasks():
    """The bundled lp_arc_easy, lp_piqa and lp_hellaswag tasks as lm-eval builds them for evaluation."""
    from lm_eval.tasks import TaskManager

    from layerprune.evaluation.tasks import tasks_dir

    manager = TaskManager(include_path=[str(tasks_dir())], include_defaults=False)
    names = {name: BUNDLED_TASKS[name].local_task for name in task_answers.SELECT_TASKS}
    loaded = manager.load(list(names.values()))["tasks"]
    return {name: loaded[task] for name, task in names.items()}


def lm_eval_gold_requests(task, documents: list[int]) -> list[tuple[str, str]]:
    """lm-eval's (context, continuation) for the gold choice of each of these documents (ascending indices)."""
    task.build_all_requests(samples=documents)
    gold = {}
    for instance in task.instances:  # doc_id counts the selected documents: 0, 1, ...
        if instance.idx == task.doc_to_target(instance.doc):
            gold[instance.doc_id] = tuple(instance.arguments)
    return [gold[i] for i in range(len(documents))]


def test_the_bundled_documents_are_those_after_the_ones_evaluation_reads(lm_eval_tasks):
    pairs = task_answers.gold_pairs(3)
    assert len(pairs) == 9
    for i, name in enumerate(task_answers.SELECT_TASKS):
        ours = pairs[3 * i: 3 * i + 3]
        assert ours == lm_eval_gold_requests(lm_eval_tasks[name], [1000, 1001, 1002]), name
        assert ours != lm_eval_gold_requests(lm_eval_tasks[name], [0, 1, 2]), name
    rows = read_task_rows(BUNDLED_TASKS["piqa"].data_file)
    assert task_answers.task_documents("piqa", 2) == list(rows[1000:1002])
    assert task_answers.max_documents() == len(rows) - 1000 == 838


def test_tasks_objective_through_the_command_line(tmp_path):
    """prune --select search --select-objective tasks: the record names the objective and the documents."""
    model = tiny_model("llama", max_position_embeddings=512)  # a character per token: documents are long
    save_model(model, tiny_tokenizer(), tmp_path / "model")
    result = CliRunner().invoke(app, ["prune", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                                      "--select", "search", "--select-objective", "tasks", "--select-tasks-docs", "2",
                                      "--num-layers", "1"])
    assert result.exit_code == 0, result.output
    assert "answer loss" in result.output
    selection = json.loads((tmp_path / "out" / "layerprune.json").read_text())["selection"]
    validation = selection["validation"]
    assert validation["objective"] == "tasks"
    assert validation["data"]["documents"] == "1000-1001 of each" and validation["data"]["rows"] == 6
    expected = hand_answer_loss(model, tiny_tokenizer(), task_answers.gold_pairs(2), selection["dropped"])
    assert validation["value"] == approx_value(expected)


# ---------------------------------------------------------------- config, runs, curve


@pytest.mark.parametrize("fields, message", [
    ({"select_objective": "kl", "num_layers": 2}, "select_objective kl judges drop-sets, which needs select auto or "
                                                  "search"),
    ({"select": "search", "num_layers": 2, "select_tasks_docs": 8}, "select_tasks_docs needs select_objective tasks"),
    ({"select": "search", "select_objective": "tasks", "num_layers": 2, "select_tasks_docs": 839}, "at most 838"),
    ({"select": "search", "select_objective": "kl", "max_loss_increase": 0.5}, "need select_objective loss"),
    ({"select": "search", "select_objective": "mse", "num_layers": 2}, "select_objective"),
])
def test_config_rules(fields, message):
    with pytest.raises(LayerpruneError, match=message):
        as_config(PruneConfig, **fields)


def test_an_objective_with_select_metric_is_one_command_line_error(tmp_path):
    result = CliRunner().invoke(app, ["prune", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"),
                                      "--num-layers", "1", "--select-objective", "kl"])
    assert_one_line_error(result, "--select-objective kl judges drop-sets")


def test_the_objective_is_part_of_the_prune_stage_key(tmp_path):
    from layerprune.config import load_run_config
    from layerprune.runs.planner import plan_stages

    def prune_key(**prune) -> tuple[dict, object]:
        path = tmp_path / "run.yaml"
        path.write_text(json.dumps({"model": "m", "prune": {"select": "search", "num_layers": 2, **prune}}))
        config = load_run_config(path)
        return next(stage.settings for stage in plan_stages(config) if stage.name == "prune"), config

    loss, config = prune_key()
    assert config.prune.select_objective == "loss"
    kl, config = prune_key(select_objective="kl")
    assert config.prune.select_objective == "kl"
    assert kl != loss and kl["prune"]["select_objective"] == "kl"
    tasks, _ = prune_key(select_objective="tasks", select_tasks_docs=8)
    assert tasks != kl and tasks["prune"]["select_tasks_docs"] == 8


def test_the_curve_traces_the_objective(tmp_path):
    from layerprune.selection.curve import trade_off_curve

    model = identity_and_perturbed_model()
    validation = calibration_from_texts(tiny_tokenizer(), CORPUS.split("\n\n"), n_samples=3, seq_len=16, seed=1)
    config = CurveConfig(metric="search", max_drop=2, select_objective="kl")
    record = trade_off_curve(model, config, calibration=None, validation=validation, log=lambda m: None)
    assert record["objective"] == "kl" and record["unpruned_loss"] == 0.0
    rows = record["curves"]["search"]
    assert rows[1]["dropped"] == [IDENTITY] and rows[1]["loss"] == pytest.approx(0.0, abs=1e-6)
    assert rows[2]["loss"] == approx_value(hand_kl(model, validation, rows[2]["dropped"]))
    with pytest.raises(LayerpruneError, match="need select_objective loss"):
        as_config(CurveConfig, select_objective="tasks", max_ppl_ratio=2.0)


def test_curve_command_with_kl(tmp_path, corpus_file):
    save_model(identity_and_perturbed_model(), tiny_tokenizer(), tmp_path / "model")
    result = CliRunner().invoke(app, ["curve", str(tmp_path / "model"), "--out", str(tmp_path / "curve"),
                                      "--metric", "search", "--max-drop", "1", "--select-objective", "kl",
                                      "--calib", str(corpus_file), "--n-samples", "3", "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    assert re.search(r"│ 1 │\s+0\.0000\*? │", result.output), result.output  # the table shows the KL, not exp(KL)
    record = json.loads((tmp_path / "curve" / "curve.json").read_text())
    assert record["objective"] == "kl" and record["config"]["select_objective"] == "kl"
    assert record["curves"]["search"][1]["dropped"] == [IDENTITY]
