"""Budgets: prune to a parameter count or a latency ratio; the fewest layers in the metric's order; clear errors."""

import copy
import json

import pytest
import torch
import yaml
from typer.testing import CliRunner

from layerprune import LayerpruneError, LayerScores, choose_layers, compute_scores, remove_layers
from layerprune.selection.budgets import Budget, measure_layer_costs, parse_param_count, select_with_budget
from layerprune.cli import app
from layerprune.config import load_run_config
from layerprune.data.calibration import CalibrationData
from layerprune.models.anatomy import count_parameters
from layerprune.models.saving import save_model
from cli_asserts import assert_one_line_error
from tiny_models import N_LAYERS, tiny_input, tiny_model

# Hand count for the tiny configs (hidden 32, 4 query / 2 kv heads of 8, vocab 128):
# attention q,o 32x32 + k,v 32x16 = 3072; qwen3 adds q_norm/k_norm (8 + 8); two RMSNorms of 32.
LLAMA_LAYER = 3072 + 3 * 32 * 64 + 2 * 32  # dense MLP 32->64->32 (gate, up, down): 9280
LLAMA_OUTSIDE = 2 * 128 * 32 + 32  # embeddings + untied lm_head + final norm: 8224
QWEN_DENSE = 3072 + 16 + 3 * 32 * 64 + 2 * 32  # 9296
QWEN_SPARSE = 3072 + 16 + 4 * 3 * 32 * 32 + 32 * 4 + 2 * 32  # 4 experts of width 32 + router: 15568


def scores(values, metric="m"):
    return LayerScores(metric=metric, layers=list(range(len(values))), values=values)


def test_parse_param_count():
    assert parse_param_count("100M") == 100_000_000
    assert parse_param_count("1.5B") == 1_500_000_000
    assert parse_param_count("350k") == 350_000
    assert parse_param_count(" 2e9 ") == 2_000_000_000
    assert parse_param_count("1,000") == 1000 and parse_param_count(1234) == 1234
    for bad in ("12Q", "-5M", "M", 0, True):
        with pytest.raises(LayerpruneError):
            parse_param_count(bad)


def test_hand_count_matches_the_model():
    assert count_parameters(tiny_model("llama"))["per_layer"] == [LLAMA_LAYER] * N_LAYERS
    moe = count_parameters(tiny_model("qwen3_moe"))  # decoder_sparse_step 2: layers 1 and 3 are sparse
    assert moe["per_layer"] == [QWEN_DENSE, QWEN_SPARSE, QWEN_DENSE, QWEN_SPARSE, QWEN_DENSE]


def test_target_params_drops_the_fewest_layers_in_ranking_order():
    model = tiny_model("qwen3_moe")
    total = 3 * QWEN_DENSE + 2 * QWEN_SPARSE + LLAMA_OUTSIDE
    assert count_parameters(model)["total"] == total
    budget = Budget(target_params="40k")
    # reverse-order drops 4 (dense), 3 (sparse), 2 (dense): 67248 -> 57952 -> 42384 -> 33088 <= 40000
    selection = select_with_budget(model, compute_scores(model, "reverse-order"), budget)
    assert selection.dropped == [2, 3, 4]
    assert selection.constraints["params_after"] == total - 2 * QWEN_DENSE - QWEN_SPARSE
    # a ranking that puts the sparse layers first reaches the target with two: 67248 - 2 x 15568 = 36112
    selection = select_with_budget(model, scores([5.0, 1.0, 4.0, 2.0, 3.0]), budget)
    assert selection.dropped == [1, 3] and selection.constraints["params_after"] == total - 2 * QWEN_SPARSE
    # the result really is that small once pruned
    pruned = remove_layers(copy.deepcopy(model), selection.dropped)
    assert count_parameters(pruned)["total"] == total - 2 * QWEN_SPARSE <= 40_000


def test_protected_layers_are_skipped_by_a_params_target():
    model = tiny_model("llama")
    # reverse-order with the last layer protected drops 3 then 2: 54624 -> 45344 -> 36064
    selection = select_with_budget(model, compute_scores(model, "reverse-order"), Budget(target_params=40_000),
                                   protect_last=1)
    assert selection.dropped == [2, 3]


def test_unreachable_and_needless_params_targets_are_one_clear_error():
    model = tiny_model("llama")
    ranking = compute_scores(model, "reverse-order")
    with pytest.raises(LayerpruneError, match=r"target_params 5k \(5,000\) is unreachable: dropping the most layers "
                       rf"allowed \(4 of 5\) leaves {LLAMA_LAYER + LLAMA_OUTSIDE:,} parameters \(8,224 outside"):
        select_with_budget(model, ranking, Budget(target_params="5k"))
    with pytest.raises(LayerpruneError, match="needs no pruning: the model has 54,624 parameters"):
        select_with_budget(model, ranking, Budget(target_params="1M"))


def test_angular_target_drops_one_contiguous_block_of_the_needed_size():
    model = tiny_model("llama")
    ids = tiny_input(batch=4, length=16)
    calibration = CalibrationData(ids, torch.ones_like(ids))
    dropped, how = choose_layers(model, metric="angular", calibration=calibration, target_params=40_000)
    assert len(dropped) == 2 and dropped[1] == dropped[0] + 1
    constraints = how["constraints"]
    assert constraints["target_params"] == 40_000 and constraints["params_after"] == 54_624 - 2 * LLAMA_LAYER


COSTS = {"mode": "decode", "layer_s": [1.0, 2.0, 3.0, 4.0, 5.0], "overhead_s": 5.0, "total_s": 20.0}


def test_latency_target_with_a_given_cost_model():
    ranking = scores([5.0, 4.0, 3.0, 2.0, 1.0])  # drops 4, 3, 2, ... first
    model = tiny_model("llama")
    # 20 -> 15 (0.75) -> 11 (0.55) -> 8 (0.40): three layers for 0.5
    selection = select_with_budget(model, ranking, Budget(target_latency=0.5), latency_costs=COSTS)
    assert selection.dropped == [2, 3, 4]
    assert selection.constraints["estimated_latency_ratio"] == pytest.approx(0.4)
    assert selection.constraints["latency"] == COSTS
    with pytest.raises(LayerpruneError, match=r"target_latency 0.2 is unreachable: dropping the most layers allowed "
                       r"\(4 of 5\) leaves 0.300 of the measured decode latency \(0.250 is outside the layers\)"):
        select_with_budget(model, ranking, Budget(target_latency=0.2), latency_costs=COSTS)


def test_latency_target_uses_real_measurements():
    # Wide layers so they, not Python overhead, dominate; a loose target and slack absorb a busy machine.
    model = tiny_model("llama", hidden_size=256, intermediate_size=1024, num_attention_heads=4, head_dim=64)
    costs = measure_layer_costs(model, mode="prefill", seq_len=32, runs=7)
    assert len(costs["layer_s"]) == N_LAYERS and min(costs["layer_s"]) > 0
    assert costs["total_s"] == pytest.approx(sum(costs["layer_s"]) + costs["overhead_s"])
    # A target that needs at least one layer gone and that one layer always reaches, whatever share of the
    # measured time a busy machine puts outside the layers (a fixed 0.7 was unreachable at load 5).
    target = 1 - 0.5 * min(costs["layer_s"]) / costs["total_s"]
    selection = select_with_budget(model, compute_scores(model, "reverse-order"),
                                   Budget(target_latency=target, latency_mode="prefill"), latency_costs=costs)
    assert 1 <= len(selection.dropped) < N_LAYERS
    kept = [t for i, t in enumerate(costs["layer_s"]) if i not in selection.dropped]
    ratio = selection.constraints["estimated_latency_ratio"]
    assert ratio <= target and ratio == pytest.approx((costs["overhead_s"] + sum(kept)) / costs["total_s"], rel=1e-6)
    # (whether the pruned model then measures <= 0.7 is a timing question: bench/, not a unit test)


# ----------------------------------------------------------------------------- CLI and YAML

runner = CliRunner()


@pytest.fixture
def tiny_dir(tmp_path):
    save_model(tiny_model("llama"), None, tmp_path / "tiny")
    return tmp_path / "tiny"


@pytest.mark.integration
def test_cli_prunes_to_a_parameter_target(tiny_dir, tmp_path):
    result = runner.invoke(app, ["prune", str(tiny_dir), "--target-params", "40k", "--metric", "reverse-order", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "layerprune.json").read_text())
    assert record["dropped_layers"] == [3, 4]
    assert record["history"][-1]["params_after"] == 54_624 - 2 * LLAMA_LAYER


@pytest.mark.integration
def test_cli_prunes_to_a_latency_target(tiny_dir, tmp_path, monkeypatch):
    import layerprune.selection.strategies

    monkeypatch.setattr(layerprune.selection.strategies, "measure_layer_costs",
                        lambda model, mode: {**COSTS, "mode": mode})
    result = runner.invoke(app, ["prune", str(tiny_dir), "--target-latency", "0.5", "--latency-mode", "prefill",
                                 "--metric", "reverse-order",
                                 "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "estimated prefill latency: 0.400" in result.output
    assert json.loads((tmp_path / "out" / "layerprune.json").read_text())["dropped_layers"] == [2, 3, 4]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--target-params", "1k"], "target_params 1k (1,000) is unreachable"),
        (["--target-params", "lots"], "could not read a parameter count from 'lots'"),
        (["--ratio", "0.5", "--target-params", "40k"], "give exactly one of --drop, --num-layers, --ratio, "
                                                        "--target-params or --target-latency"),
        (["--target-latency", "1.5"], "--target-latency: Input should be less than 1 (got 1.5)"),
        (["--target-latency", "0.5", "--latency-mode", "warp"], "--latency-mode: Input should be 'decode' or 'prefill'"),
    ],
)
def test_cli_budget_errors(tiny_dir, tmp_path, args, fragment):
    out = tmp_path / "out"
    assert_one_line_error(runner.invoke(app, ["prune", str(tiny_dir), *args, "--metric", "reverse-order",
                                              "--out", str(out)]), fragment)
    assert not out.exists()


@pytest.mark.parametrize(
    "prune, message",
    [
        ({"num_layers": -2}, "prune.num_layers: Input should be greater than or equal to 1 (got -2)"),
        ({"metric": "blockinfluence", "num_layers": 2}, "prune.metric: unknown metric 'blockinfluence'"),
        ({"ratio": 0.25, "target_params": "100M"},
         "prune: give exactly one of drop, num_layers, ratio, target_params or target_latency"),
        ({"target_params": "100Q"}, "prune.target_params: could not read a parameter count from '100Q'"),
        ({"target_latency": 1.5}, "prune.target_latency: Input should be less than 1"),
        ({"target_params": "1M", "strategy": "iterative", "schedule": "1:1:2"}, "prune: an iterative schedule fixes"),
    ],
)
def test_config_errors_are_one_message_naming_the_key(tmp_path, prune, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny", "prune": {"metric": "reverse-order", **prune}}))
    with pytest.raises(LayerpruneError) as err:
        load_run_config(path)
    assert str(err.value).startswith(f"{path}: {message}"), str(err.value)
    assert "\n" not in str(err.value)


def test_config_budget_round_trip(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny", "prune": {"metric": "block-influence", "target_params": "100M"}}))
    budget = load_run_config(path).prune.budget()
    assert budget == Budget(target_params="100M") and budget.is_target
