"""`layerprune curve`: validation perplexity for k = 0..K layers removed, per metric and for the search."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import typer.main
from typer.testing import CliRunner

from layerprune import save_model
from layerprune.cli import app
from layerprune.cli.options import CALIBRATION_OPTIONS
from layerprune.selection.config import CurveConfig
from layerprune.selection.curve import knee, max_drop_count
from layerprune.data.calibration import load_calibration
from layerprune.importance import compute_scores
from layerprune.selection.drop_set_losses import DropSetLosses
from layerprune.models.loading import load_model
from layerprune.selection.search import SearchPath
from layerprune.selection.ranking import select_layers
from cli_asserts import assert_one_line_error
from test_search import full_forward_loss
from numerics import approx_value
from tiny_models import CORPUS, N_LAYERS, tiny_model, tiny_tokenizer

runner = CliRunner()
TEXT = CORPUS  # tiny_models.CORPUS, shared
SELECTIONS = ["block-influence", "angular", "search"]


@pytest.fixture(scope="module")
def curve_run(tmp_path_factory):
    """A curve of 3 selections on a saved tiny Llama, k = 0..3, with a perplexity-ratio target."""
    tmp = tmp_path_factory.mktemp("curve")
    save_model(tiny_model("llama", seed=2), tiny_tokenizer(), tmp / "tiny")
    (tmp / "text.txt").write_text(TEXT)
    result = runner.invoke(app, ["curve", str(tmp / "tiny"), "--out", str(tmp / "out"),
                                 "--metric", ",".join(SELECTIONS),
                                 "--max-drop", "3", "--max-ppl-ratio", "1.01", "--calib", str(tmp / "text.txt"),
                                 "--n-samples", "4", "--seq-len", "32"])
    assert result.exit_code == 0, result.output
    return tmp, json.loads((tmp / "out" / "curve.json").read_text())


def test_curve_files_hold_one_row_per_selection_and_k(curve_run):
    tmp, record = curve_run
    with open(tmp / "out" / "curve.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["selection"], int(r["k"])) for r in rows] == [(s, k) for s in SELECTIONS for k in range(4)]
    assert (tmp / "out" / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in rows:
        assert float(row["perplexity"]) == pytest.approx(math.exp(float(row["loss"])), rel=1e-4)
        assert len(row["dropped"].split()) == int(row["k"])


def test_curve_plot_draws_each_selection_its_knee_and_the_target(curve_run, drawn):
    from layerprune.selection.curve import plot_curve

    tmp, record = curve_run
    plot_curve(record, tmp / "again.png")
    ax = drawn[0].axes[0]
    lines = {line.get_label(): line for line in ax.lines}
    for name, rows in record["curves"].items():
        line = lines[f"{name} (knee {record['knees'][name]})"]
        assert list(line.get_xdata()) == [r["k"] for r in rows]
        assert list(line.get_ydata()) == pytest.approx([r["perplexity"] for r in rows])
    target = lines[record["target"]["name"]]  # the dashed line at the allowed perplexity
    allowed = record["unpruned_perplexity"] * math.exp(record["target"]["allowed_loss_increase"])
    assert list(target.get_ydata()) == pytest.approx([allowed, allowed])
    assert ax.get_yscale() == "log"


def test_k0_is_the_unpruned_model_and_every_point_is_a_real_forward(curve_run):
    tmp, record = curve_run
    loaded = load_model(str(tmp / "tiny"))
    validation = load_calibration(loaded.tokenizer, str(tmp / "text.txt"), n_samples=4, seq_len=32, seed=1000)
    unpruned = full_forward_loss(loaded.model, validation, [])
    assert record["unpruned_loss"] == approx_value(unpruned)
    for name in SELECTIONS:
        rows = record["curves"][name]
        assert rows[0]["loss"] == record["unpruned_loss"] and rows[0]["dropped"] == []
        for row in rows[1:]:
            assert row["loss"] == approx_value(full_forward_loss(loaded.model, validation, row["dropped"]))


def test_each_selection_traces_its_own_drop_sets(curve_run):
    tmp, record = curve_run
    loaded = load_model(str(tmp / "tiny"))
    calibration = load_calibration(loaded.tokenizer, str(tmp / "text.txt"), n_samples=4, seq_len=32, seed=0)
    influence = compute_scores(loaded.model, "block-influence", calibration)
    for row in record["curves"]["block-influence"][1:]:
        assert row["dropped"] == select_layers(influence, num_layers=row["k"]).dropped
    for row in record["curves"]["angular"][1:]:  # its best block of k: one scoring pass covers every k
        angular = compute_scores(loaded.model, "angular", calibration, block_size=row["k"])
        assert row["dropped"] == select_layers(angular, num_layers=row["k"]).dropped
    validation = load_calibration(loaded.tokenizer, str(tmp / "text.txt"), n_samples=4, seq_len=32, seed=1000)
    path = SearchPath(DropSetLosses(loaded.model, validation), list(range(N_LAYERS)), list(range(N_LAYERS)))
    assert [row["dropped"] for row in record["curves"]["search"][1:]] == [
        sorted(path.at(k).positions) for k in (1, 2, 3)]
    assert record["search"]["path"][0]["candidates"] and record["search"]["beam"] == 1
    # shared work: one intact pass, candidates resumed from cached states, shared drop-sets measured once
    assert record["block_forwards"] < 0.7 * record["naive_block_forwards"]


def test_knee_and_chosen_count(curve_run):
    _, record = curve_run
    assert knee([3.0, 3.05, 3.1, 3.4, 3.5], slope=0.1) == 2  # k = 3 adds 0.3 nats
    assert knee([3.0, 3.05, 3.1], slope=0.1) == 2  # never steeper: the last k
    assert knee([3.0, 3.5], slope=0.1) == 0
    allowed = math.log(1.01)
    for name, chosen in record["chosen"].items():
        rows = record["curves"][name]
        k = chosen["k"]
        assert all(row["loss"] - record["unpruned_loss"] <= allowed for row in rows[1:k + 1])
        assert k == len(rows) - 1 or rows[k + 1]["loss"] - record["unpruned_loss"] > allowed
        assert chosen["dropped"] == rows[k]["dropped"]
        assert record["knees"][name] == knee([row["loss"] for row in rows], record["knee_slope"])
    assert record["target"]["name"] == "max_ppl_ratio 1.01"


def test_every_curve_setting_is_an_option_that_defers_to_the_config():
    params = {p.name: p for p in typer.main.get_command(app).commands["curve"].params}
    expected = (set(CurveConfig.model_fields) - {"calibration"}) | set(CALIBRATION_OPTIONS.values())
    assert not expected - set(params)
    assert all(params[name].default is None for name in expected)


def test_max_drop_and_selection_errors(tmp_path):
    assert max_drop_count(0.5, 30) == 15 and max_drop_count(8, 30) == 8
    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "tiny")
    result = runner.invoke(app, ["curve", str(tmp_path / "tiny"), "--out", str(tmp_path / "a"), "--max-drop", "5",
                                 "--metric", "reverse-order"])
    assert_one_line_error(result, "max_drop 5 means 5 of 5 layers")
    result = runner.invoke(app, ["curve", str(tmp_path / "tiny"), "--out", str(tmp_path / "b"),
                                 "--metric", "block-influence,mlp-influence"])
    assert_one_line_error(result, "unknown selection 'mlp-influence'")
    result = runner.invoke(app, ["curve", str(tmp_path / "tiny"), "--out", str(tmp_path / "c"), "--max-drop", "2.5"])
    assert_one_line_error(result, "whole number of layers")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_data_free_selections_need_no_calibration_scores(tmp_path):
    """reverse-order alone reads no calibration text for scores; the validation text still judges it."""
    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(TEXT)
    result = runner.invoke(app, ["curve", str(tmp_path / "tiny"), "--out", str(tmp_path / "out"),
                                 "--metric", "reverse-order", "--max-drop", "0.4",
                                 "--calib", str(tmp_path / "text.txt"),
                                 "--n-samples", "2", "--seq-len", "16"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "curve.json").read_text())
    assert record["calibration"] is None and record["validation"]["seed"] == 1000
    assert [row["dropped"] for row in record["curves"]["reverse-order"]] == [[], [4], [3, 4]]
    assert torch.isfinite(torch.tensor([row["loss"] for row in record["curves"]["reverse-order"]])).all()


def test_a_run_traces_the_curve_as_a_stage(tmp_path):
    import yaml

    from layerprune.config import load_run_config
    from layerprune.runs.pipeline import run_pipeline

    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(TEXT)
    calibration = {"source": str(tmp_path / "text.txt"), "n_samples": 2, "seq_len": 16}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({
        "model": str(tmp_path / "tiny"), "out": str(tmp_path / "run"),
        "prune": {"select": "search", "max_ppl_ratio": 1.5, "calibration": calibration},
        "curve": {"metric": ["reverse-order", "search"], "max_drop": 4, "calibration": calibration}}))
    run_pipeline(load_run_config(tmp_path / "run.yaml"), log=lambda m: None)
    record = json.loads((tmp_path / "run" / "curve" / "curve.json").read_text())
    assert list(record["curves"]) == ["reverse-order", "search"]
    assert (tmp_path / "run" / "curve" / "curve.png").exists()
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    # the prune's search and the curve's measure the same validation text the same way
    k = selection["constraints"]["num_layers"]
    assert selection["dropped"] == record["curves"]["search"][k]["dropped"]
    assert selection["validation"]["loss"] == pytest.approx(record["curves"]["search"][k]["loss"], abs=1e-9)
    assert (k == 4 or record["curves"]["search"][k + 1]["ppl_ratio"] > 1.5) and record["curves"]["search"][k][
        "ppl_ratio"] <= 1.5
