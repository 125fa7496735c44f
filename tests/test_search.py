"""Drop-set search by validation loss (select: search) and quality targets, on tiny models.

The search model is a tiny Llama trained for a few seconds on repetitive text, with layer 1 an exact
identity (its attention and MLP output projections zeroed and frozen): removing it costs nothing, and
training makes layer 0 the layer the model cannot do without."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from layerprune import LayerpruneError, save_model
from layerprune.cli import app
from layerprune.selection.config import PruneConfig
from layerprune.data.calibration import CalibrationData, calibration_from_texts
from layerprune.selection.drop_set_losses import DropSetLosses
from layerprune.models.bypass import bypass_layers
from layerprune.selection.search import SearchPath, swap_pass
from layerprune.selection.strategies import choose, in_memory_scores
from cli_asserts import assert_one_line_error
from numerics import approx_value
from tiny_models import N_LAYERS, tiny_input, tiny_model, tiny_tokenizer

SENTENCES = [f"the {w} sat on the mat and looked at the {v}." for w in ("cat", "dog", "owl")
             for v in ("sun", "sky", "sea")]
IDENTITY, DESTRUCTIVE = 1, 0
ALL = list(range(N_LAYERS))


@torch.no_grad()
def full_forward_loss(model, data: CalibrationData, drop) -> float:
    """Reference: mean next-token loss of whole forwards with the blocks at positions `drop` bypassed."""
    total, count = 0.0, 0
    with bypass_layers(model, drop):
        for ids, mask in data.batches(4):
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill((mask[:, 1:] == 0) | (mask[:, :-1] == 0), -100)
            total += torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100,
                                                       reduction="sum").item()
            count += int((target != -100).sum())
    return total / count


@pytest.fixture(scope="module")
def trained():
    """(model, validation text): the tiny Llama with an identity layer, trained on repetitive text."""
    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    identity = model.model.layers[IDENTITY]
    for weight in (identity.self_attn.o_proj.weight, identity.mlp.down_proj.weight):
        with torch.no_grad():
            weight.zero_()
        weight.requires_grad_(False)
    train = calibration_from_texts(tokenizer, SENTENCES * 20, n_samples=16, seq_len=32, seed=5)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    for _ in range(60):
        loss = model(input_ids=train.input_ids, labels=train.input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return model, calibration_from_texts(tokenizer, SENTENCES * 20, n_samples=6, seq_len=32, seed=1)


def test_greedy_search_removes_the_identity_first_and_the_destructive_layer_last(trained):
    model, validation = trained
    losses = DropSetLosses(model, validation)
    single = {p: losses.loss({p}) - losses.intact_loss for p in ALL}
    assert single[IDENTITY] == pytest.approx(0.0, abs=1e-6)  # an exact identity
    assert min(v for p, v in single.items() if p != IDENTITY) > 0.05
    assert single[DESTRUCTIVE] > 3 * max(v for p, v in single.items() if p != DESTRUCTIVE)

    path = SearchPath(losses, ALL, ALL)
    order = [next(iter(path.at(k).positions - (path.at(k - 1).positions if k > 1 else frozenset())))
             for k in range(1, N_LAYERS)]
    assert order[0] == IDENTITY
    assert set(ALL) - set(order) == {DESTRUCTIVE}  # the one layer never removed
    # each step removed the layer whose removal (given the earlier ones) raised the loss least
    for step in path.steps:
        assert step["loss"] == min(c["loss"] for c in step["candidates"])
        assert len(step["candidates"]) == N_LAYERS - step["k"] + 1


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2", "gpt2"])
def test_resumed_candidates_equal_full_forwards(family):
    """Candidates resumed from cached states (the intact pass's, a parent's, an earlier candidate's) give the
    loss of a whole forward, and cost fewer block forwards than rerunning the model for each."""
    model = tiny_model(family)
    ids = tiny_input(batch=5, length=16)
    mask = torch.ones_like(ids)
    mask[1, 11:] = 0  # right padding
    data = CalibrationData(ids, mask)
    losses = DropSetLosses(model, data, batch_size=2)
    path = SearchPath(losses, ALL, ALL)
    path.at(3)
    tried = [c for step in path.steps for c in step["candidates"]]
    assert len(tried) == 5 + 4 + 3
    checked = [frozenset(s) for s in ({1}, {0, 4}, {2, 3}, {1, 2, 4})] + [path.at(k).positions for k in (1, 2, 3)]
    for drop in checked:
        assert losses.loss(drop) == approx_value(full_forward_loss(model, data, drop)), sorted(drop)
    assert losses.intact_loss == approx_value(full_forward_loss(model, data, []))
    assert losses.block_forwards < 0.6 * losses.naive_block_forwards


def test_lineage_states_skip_blocks_the_parent_cache_would_rerun():
    """Step 2 candidate {j, j*} with j < j* resumes from candidate {j}'s state entering j*."""
    model = tiny_model("llama", num_hidden_layers=6)
    data = CalibrationData(tiny_input(batch=2, length=12), torch.ones(2, 12, dtype=torch.long))
    losses = DropSetLosses(model, data, batch_size=2)
    intact = losses.block_forwards
    losses.loss({1})  # runs blocks 2..5 and keeps their entering states
    losses.retain([{4}])
    losses.ensure_chain({4})
    before = losses.block_forwards
    value = losses.loss({1, 4})  # resumes at block 4 (dropped), runs block 5 only
    assert losses.block_forwards - before == 1
    assert value == approx_value(full_forward_loss(model, data, [1, 4]))
    assert intact == 6
    # with no room for extra states, the same candidate reruns blocks 2, 3 and 5
    bare = DropSetLosses(model, data, batch_size=2, cache_bytes=0)
    bare.loss({1})
    bare.ensure_chain({4})
    before = bare.block_forwards
    assert bare.loss({1, 4}) == pytest.approx(value, abs=1e-6)
    assert bare.block_forwards - before == 3


def test_a_wide_beam_finds_the_best_drop_set_of_every_size():
    model = tiny_model("llama", seed=3)
    data = CalibrationData(tiny_input(batch=4, length=16), torch.ones(4, 16, dtype=torch.long))
    losses = DropSetLosses(model, data)
    path = SearchPath(losses, ALL, ALL, beam=10)  # 10 >= C(5, k): nothing is ever pruned from the beam
    for k in range(1, N_LAYERS):
        best = min(itertools.combinations(ALL, k), key=lambda d: losses.loss(d))
        assert path.at(k).loss == pytest.approx(losses.loss(best), abs=1e-9)


def test_swap_pass_puts_back_the_destructive_layer(trained):
    model, validation = trained
    losses = DropSetLosses(model, validation)
    dropped, swaps = swap_pass(losses, {DESTRUCTIVE, 3}, ALL, ALL)
    assert DESTRUCTIVE not in dropped and len(dropped) == 2
    assert swaps[0]["restored"] == DESTRUCTIVE and swaps[0]["loss"] < swaps[0]["loss_before"]
    # the first swap alone reached the best pair that keeps layer 3 removed; the second can only improve on it
    assert losses.loss(dropped) <= min(losses.loss(d) for d in itertools.combinations(ALL, 2) if 3 in d)


def _choose(model, validation, **fields):
    config = PruneConfig(**fields)
    return choose(model, config, score=in_memory_scores(model, validation), validation=validation, log=lambda m: None)


def test_quality_target_between_two_sizes_picks_the_largest_within(trained):
    model, validation = trained
    record = _choose(model, validation, select="search", num_layers=4)
    path = record["search"]["path"]
    base = record["validation"]["unpruned_loss"]
    increase = [step["loss"] - base for step in path]  # k = 1..4
    assert increase == sorted(increase)
    middle = (increase[1] + increase[2]) / 2  # between k = 2 and k = 3
    by_nats = _choose(model, validation, select="search", max_loss_increase=middle)
    assert by_nats["dropped"] == path[1]["dropped"] and by_nats["constraints"]["num_layers"] == 2
    assert by_nats["constraints"]["validation_loss_increase"] == pytest.approx(increase[1])
    by_ratio = _choose(model, validation, select="search", max_ppl_ratio=math.exp(middle))
    assert by_ratio["dropped"] == path[1]["dropped"]
    # the walk stopped at the first size over the target: the path holds k = 1..3
    assert [step["k"] for step in by_nats["search"]["path"]] == [1, 2, 3]
    # a metric's own drop-sets work too: the largest count within the target, the next one over it
    by_metric = _choose(model, validation, metric="block-influence", max_loss_increase=middle)
    k = by_metric["constraints"]["num_layers"]
    assert k >= 1 and all(step["loss"] - base <= middle for step in by_metric["path"])
    over = _choose(model, validation, metric="block-influence", num_layers=k + 1)
    assert full_forward_loss(model, validation, over["dropped"]) - base > middle


def test_quality_target_guards_a_parameter_target(trained):
    model, validation = trained
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    record = _choose(model, validation, select="search", num_layers=3)
    path, base = record["search"]["path"], record["validation"]["unpruned_loss"]
    two_layers = total - 2 * per_layer  # the parameter target needs at least 2 layers removed
    record = _choose(model, validation, select="search", target_params=two_layers,
                     max_loss_increase=path[2]["loss"] - base + 0.01)
    assert record["dropped"] == path[1]["dropped"]  # the fewest layers meeting the size target
    assert record["constraints"]["params_after"] == two_layers
    with pytest.raises(LayerpruneError) as err:  # the size needs 3 layers; the quality allows 2
        _choose(model, validation, select="search", target_params=total - 3 * per_layer,
                max_loss_increase=(path[1]["loss"] + path[2]["loss"]) / 2 - base)
    message = str(err.value)
    assert "cannot both hold" in message and "at least 3" in message and "at most 2" in message
    assert f"target_params >= {two_layers:,}" in message and "max_loss_increase >=" in message


def test_an_unreachable_quality_target_is_one_error_saying_what_is_reachable(trained, tmp_path):
    model, validation = trained
    with pytest.raises(LayerpruneError, match=r"unreachable: removing even one layer .* reachable: "
                                              r"max_ppl_ratio >= 1\.\d+"):
        _choose(model, validation, select="search", max_ppl_ratio=1.001, protect_first=2)
    save_model(model, tiny_tokenizer(), tmp_path / "model")
    (tmp_path / "text.txt").write_text("\n\n".join(SENTENCES * 20))
    result = CliRunner().invoke(app, ["prune", str(tmp_path / "model"), "--out", str(tmp_path / "out"),
                                      "--select", "search", "--max-loss-increase", "0.001", "--protect-first", "2",
                                      "--calib", str(tmp_path / "text.txt"), "--n-samples", "4", "--seq-len", "32"])
    assert_one_line_error(result, "max_loss_increase 0.001 is unreachable")
    assert not (tmp_path / "out").exists()


def test_search_record_reaches_selection_json_and_layerprune_json(trained, tmp_path):
    from layerprune.config import load_run_config
    from layerprune.runs.pipeline import run_pipeline

    model, _ = trained
    save_model(model, tiny_tokenizer(), tmp_path / "model")
    (tmp_path / "text.txt").write_text("\n\n".join(SENTENCES * 20))
    calibration = {"source": str(tmp_path / "text.txt"), "n_samples": 4, "seq_len": 32}
    (tmp_path / "run.yaml").write_text(json.dumps({
        "model": str(tmp_path / "model"), "out": str(tmp_path / "run"),
        "prune": {"select": "search", "num_layers": 2, "search_beam": 2, "search_swap": True,
                  "calibration": calibration}}))
    run_pipeline(load_run_config(tmp_path / "run.yaml"), log=lambda m: None)
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    saved = json.loads((tmp_path / "run" / "pruned" / "layerprune.json").read_text())["selection"]
    assert saved == selection
    assert selection["chosen_by"] == "search" and IDENTITY in selection["dropped"]
    search = selection["search"]
    assert search["beam"] == 2 and search["swap"] is True and "swaps" in search
    assert [len(step["beam"]) for step in search["path"]] == [2, 2]
    assert len(search["path"][0]["candidates"]) == N_LAYERS
    validation = selection["validation"]
    assert 0 < validation["block_forwards"] < validation["naive_block_forwards"]
    assert validation["data"]["seed"] == 1000  # the held-out text of select auto, not the calibration's
    assert selection["validation"]["loss"] == pytest.approx(search["path"][-1]["loss"])


@pytest.mark.parametrize("fields, message", [
    ({"select": "search", "max_loss_increase": 0.5, "max_ppl_ratio": 2.0}, "not both"),
    ({"select": "search", "num_layers": 2, "max_loss_increase": 0.5}, "exactly one of"),
    ({"select": "search", "num_layers": 2, "metric": "angular"}, "metric is not used"),
    ({"num_layers": 2, "search_beam": 2}, "need select search"),
    ({"select": "search", "target_params": "40k", "search_swap": True}, "search_swap"),
    ({"select": "search", "schedule": "1:1:2"}, "one-shot"),
    ({"metric": "reverse-order", "schedule": "1:1:2", "max_ppl_ratio": 2.0}, "strategy one-shot"),
    ({"granularity": "mlp", "metric": "mlp-influence", "max_ppl_ratio": 2.0}, "removes whole layers"),
    ({"select": "search", "max_ppl_ratio": 1.0}, "greater than 1"),
])
def test_config_rules(fields, message):
    with pytest.raises(ValueError, match=message):
        PruneConfig(**fields)


def test_quality_targets_are_budgets_that_may_guard_a_size_target():
    assert PruneConfig(select="search", max_loss_increase=0.5).budget() is None
    both = PruneConfig(select="search", target_params="40k", max_ppl_ratio=2.0)
    assert both.budget().target_params == "40k" and both.quality_target().allowed_increase == pytest.approx(
        math.log(2.0))
    assert PruneConfig(select="search", num_layers=2).metrics == []
