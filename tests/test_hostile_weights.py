"""Weights that hold NaN or infinity are found before scoring: one line naming the tensors, nothing written
(docs/safety.md)."""

import pytest
import torch
from typer.testing import CliRunner

from layerprune import save_model
from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.importance import compute_scores
from layerprune.importance.registry import compute_many
from cli_asserts import assert_one_line_error
from test_pipeline import TEXT
from tiny_models import tiny_input, tiny_model, tiny_tokenizer

runner = CliRunner()


def poisoned(value=float("nan")):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.up_proj.weight[0, 0] = value
        model.model.layers[4].self_attn.q_proj.weight[1, 1] = float("inf")
    return model


@pytest.mark.parametrize("value", [float("nan"), float("-inf")])
def test_prune_refuses_non_finite_weights_naming_them(tmp_path, value):
    save_model(poisoned(value), tiny_tokenizer(), tmp_path / "model")
    (tmp_path / "text.txt").write_text(TEXT)
    result = runner.invoke(app, ["prune", str(tmp_path / "model"), "--num-layers", "2", "--metric", "block-influence",
                                 "--calib", str(tmp_path / "text.txt"), "--n-samples", "2", "--seq-len", "16",
                                 "--out", str(tmp_path / "pruned")])
    assert_one_line_error(result, "NaN or infinite weights in model.layers.2.mlp.up_proj.weight, "
                                  "model.layers.4.self_attn.q_proj.weight")
    assert not (tmp_path / "pruned").exists()


def test_scoring_in_memory_refuses_them_and_a_finite_model_scores():
    from layerprune.data.calibration import CalibrationData

    ids = tiny_input(batch=2, length=8)
    calibration = CalibrationData(ids, torch.ones_like(ids), {})
    with pytest.raises(LayerpruneError, match="NaN or infinite weights"):
        compute_many(poisoned(), {"block-influence": {}}, calibration)
    scores = compute_scores(tiny_model("llama"), "block-influence", calibration)
    assert all(v == v for v in scores.values)  # no NaN


def test_the_layer_by_layer_scorer_refuses_them_too(tmp_path):
    from layerprune.data.calibration import CalibrationData
    from layerprune.importance.streaming import stream_scores

    save_model(poisoned(), tiny_tokenizer(), tmp_path / "model")
    ids = tiny_input(batch=2, length=8)
    with pytest.raises(LayerpruneError, match=r"NaN or infinite weights in model\.layers\.2\.mlp\.up_proj\.weight"):
        stream_scores(tmp_path / "model", CalibrationData(ids, torch.ones_like(ids), {}), ["block-influence"])
