"""Study plots, linear CKA of hidden states, and `layerprune report DIR` rebuilding a run's report and plots."""

import math

import pytest
import torch
from typer.testing import CliRunner

from layerprune import LayerpruneError
from layerprune.cli import app
from layerprune.data.calibration import CalibrationData
from layerprune.files.outputs import mark_output_dir
from layerprune.finetune.trainer import write_loss_curve
from layerprune.report.study_plots import (
    plot_layer_map, plot_loss_curves, plot_metric_vs_removed, plot_similarity, read_loss_csv,
)
from layerprune.report.study_report import rebuild_study_report
from layerprune.runs.study.similarity import final_hidden_states, hidden_state_similarity, linear_cka
from cli_asserts import assert_one_line_error
from tiny_models import N_LAYERS, tiny_input, tiny_model

PNG = b"\x89PNG"


def is_png(path):
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:4] == PNG


# ----------------------------------------------------------------------------- linear CKA


def test_cka_of_a_representation_with_itself_is_one():
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert linear_cka(x, x) == pytest.approx(1.0)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=generator), torch.randn(40, 5, generator=generator)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=generator, dtype=torch.float64))
    base = linear_cka(x, y)
    assert 0 < base < 1
    assert linear_cka(x.double() @ q, y) == pytest.approx(base)
    assert linear_cka(3.5 * x, 0.1 * y) == pytest.approx(base)
    assert linear_cka(x + 7.0, y) == pytest.approx(base)  # centering removes offsets
    # the n x n Gram form (n < width) agrees with the feature form
    wide = torch.randn(4, 10, generator=generator)
    assert linear_cka(wide, wide @ torch.linalg.qr(torch.randn(10, 10, generator=generator))[0]) == pytest.approx(1.0)


def test_cka_matches_a_hand_computation():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])  # columns already have mean 0
    y = torch.tensor([[1.0], [0.0], [-1.0]])
    # Xc^T Xc = [[2, 1], [1, 2]], ||.||_F = sqrt(10); Yc^T Yc = [[2]]; Yc^T Xc = [[2, 1]], ||.||_F^2 = 5
    assert linear_cka(x, y) == pytest.approx(5 / (math.sqrt(10) * 2))
    with pytest.raises(LayerpruneError, match="same n examples"):
        linear_cka(x, y[:2])


def calibration():
    ids = tiny_input(batch=4, length=12)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # padding must not enter
    return CalibrationData(ids, mask)


def test_hidden_state_similarity_of_models():
    model, other = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    states = final_hidden_states(model, calibration())
    assert states.shape == (4 * 12 - 4, 32)
    names, matrix = hidden_state_similarity({"a": model, "again": model, "b": lambda: other}, calibration())
    assert names == ["a", "again", "b"]
    assert matrix[0][1] == pytest.approx(1.0) and matrix[1][0] == pytest.approx(1.0)
    assert 0 < matrix[0][2] < 0.99 and matrix[0][2] == matrix[2][0]


def test_final_hidden_states_are_taken_before_the_final_norm():
    model = tiny_model("llama")
    data = calibration()
    ids, mask = data.input_ids, data.attention_mask
    with torch.no_grad():
        post_norm = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    ours = final_hidden_states(model, data, batch_size=8)
    assert not torch.allclose(ours, post_norm[mask.bool()].double(), atol=1e-4)
    assert torch.allclose(model.model.norm(ours.float()), post_norm[mask.bool()], atol=1e-5)


# ----------------------------------------------------------------------------- plots


def lines_of(figure) -> dict:
    """{legend label: (xs, ys)} of every line on the figure's first axes."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in figure.axes[0].lines}


def test_metric_vs_removed_plots(tmp_path, drawn):
    rows = [{"metric": m, "layers_removed": k, "acc": 0.6 - 0.05 * k * (i + 1), "wikitext2 ppl": 20 * 3**k}
            for i, m in enumerate(["block-influence", "reverse-order"]) for k in (4, 1, 2)]
    rows.append({"metric": "taylor", "layers_removed": 2, "acc": None})
    assert is_png(plot_metric_vs_removed(rows, "acc", tmp_path / "acc.png"))
    assert is_png(plot_metric_vs_removed(rows, "wikitext2 ppl", tmp_path / "ppl.png"))
    accuracy, perplexity = drawn
    # one line per metric with a value (taylor has none), points in order of layers removed
    assert lines_of(accuracy) == {"block-influence": ([1, 2, 4], pytest.approx([0.55, 0.5, 0.4])),
                                  "reverse-order": ([1, 2, 4], pytest.approx([0.5, 0.4, 0.2]))}
    assert accuracy.axes[0].get_yscale() == "linear" and perplexity.axes[0].get_yscale() == "log"
    assert lines_of(perplexity)["reverse-order"][1] == [60, 180, 1620]
    with pytest.raises(LayerpruneError, match="no rows with a 'missing' value"):
        plot_metric_vs_removed(rows, "missing", tmp_path / "none.png")


def test_layer_map_takes_lists_and_sub_layer_drops(tmp_path, drawn):
    settings = {"bi 25%": [12, 13, 14], "reverse": [27, 28, 29],
                "sub-layer": {"block": [3], "attention": [10, 11], "mlp": [20, 3]}}
    assert is_png(plot_layer_map(settings, 30, tmp_path / "map.png"))
    cells = drawn[0].axes[0].images[0].get_array()
    assert cells.shape == (3, 30)
    # 0 kept, 1 block, 2 attention, 3 MLP; a block drop wins over an MLP drop of the same layer
    assert {layer: int(cells[0][layer]) for layer in range(30) if cells[0][layer]} == {12: 1, 13: 1, 14: 1}
    assert {layer: int(cells[1][layer]) for layer in range(30) if cells[1][layer]} == {27: 1, 28: 1, 29: 1}
    assert {layer: int(cells[2][layer]) for layer in range(30) if cells[2][layer]} == {3: 1, 10: 2, 11: 2, 20: 3}
    assert [t.get_text() for t in drawn[0].axes[0].get_yticklabels()] == list(settings)
    with pytest.raises(LayerpruneError, match="layer 30 is outside 0..29"):
        plot_layer_map({"x": [30]}, 30, tmp_path / "bad.png")
    with pytest.raises(LayerpruneError, match="unknown drop kind"):
        plot_layer_map({"x": {"heads": [1]}}, 30, tmp_path / "bad.png")


def test_loss_csv_round_trip_and_curves(tmp_path, drawn):
    curve = [{"step": s, "loss": 3.0 / s, "learning_rate": 1e-4} for s in range(1, 6)]
    write_loss_curve(curve, tmp_path)
    points = read_loss_csv(tmp_path / "loss.csv")
    assert points == [(c["step"], pytest.approx(c["loss"])) for c in curve]
    assert is_png(plot_loss_curves({"lora": points, "partial": [(1, 2.0), (2, 1.5)], "empty": []},
                                   tmp_path / "curves.png"))
    assert lines_of(drawn[-1]) == {"lora": ([1, 2, 3, 4, 5], pytest.approx([3.0, 1.5, 1.0, 0.75, 0.6])),
                                  "partial": ([1, 2], [2.0, 1.5])}  # the empty curve is left out
    with pytest.raises(LayerpruneError, match="no loss curve at"):
        read_loss_csv(tmp_path / "nowhere.csv")


def test_similarity_heatmap(tmp_path, drawn):
    matrix = [[1, 0.9, 0.5], [0.9, 1, 0.6], [0.5, 0.6, 1]]
    assert is_png(plot_similarity(["a", "b", "c"], matrix, tmp_path / "s.png"))
    axes = drawn[0].axes[0]
    assert axes.images[0].get_array().tolist() == matrix
    assert axes.images[0].get_clim() == (0.5, 1.0)  # the colour range starts at the lowest similarity
    assert [t.get_text() for t in axes.texts] == ["1.00", "0.90", "0.50", "0.90", "1.00", "0.60", "0.50", "0.60",
                                                  "1.00"]
    assert is_png(plot_similarity(["a"], [[1.0]], tmp_path / "one.png"))
    assert drawn[1].axes[0].images[0].get_clim() == (0.0, 1.0)  # all ones: a colour range is kept
    with pytest.raises(LayerpruneError, match="must be 2 x 2"):
        plot_similarity(["a", "b"], [[1.0]], tmp_path / "bad.png")


# ----------------------------------------------------------------------------- layerprune report

runner = CliRunner()


@pytest.mark.integration
def test_report_rebuilds_a_run_folder(tmp_path):
    from test_pipeline import TEXT, write_config
    from layerprune import save_model
    from layerprune.config import load_run_config
    from layerprune.runs.pipeline import run_pipeline
    from tiny_models import tiny_tokenizer

    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "tiny")
    (tmp_path / "text.txt").write_text(TEXT)
    (tmp_path / "sft.jsonl").write_text("".join(
        f'{{"instruction": "say {w}", "context": "", "response": "{w} {w}"}}\n' for w in ("cat", "dog") * 4))
    config = write_config(tmp_path, prune={"metric": ["block-influence", "angular"], "select": "auto", "num_layers": 2},
                          eval=None, bench=None)
    run_pipeline(load_run_config(config), log=lambda m: None)
    run = tmp_path / "run"
    for name in ("report.md", "scores.png", "angular.png", "loss_curves.png", "layer_map.png"):
        (run / name).unlink(missing_ok=True)

    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    for name in ("scores.png", "angular.png", "loss_curves.png", "layer_map.png"):
        assert is_png(run / name), name
    report = (run / "report.md").read_text()
    assert "validation loss" in report and "Dropped original layers" in report
    assert "![layer_map](layer_map.png)" in report


@pytest.mark.integration
def test_report_of_an_iterative_run_built_from_files(tmp_path):
    import json

    from layerprune import LayerScores
    from layerprune.importance.scores_file import write_scores_json

    run = tmp_path / "run"
    for r, dropped in ((1, [4]), (2, [3])):
        folder = run / "rounds" / f"round-{r}"
        (folder / "healed-1").mkdir(parents=True)
        (folder / "selection.json").write_text(json.dumps({"dropped": dropped, "chosen_by": "reverse-order"}))
        (folder / "done.json").write_text(json.dumps({"model": str(folder / "healed-1"), "dropped": dropped}))
        write_loss_curve([{"step": s, "loss": 2.0 / s, "learning_rate": 1e-4} for s in (1, 2, 3)], folder / "healed-1")
        layers = list(range(N_LAYERS - r + 1))
        scores = LayerScores("reverse-order", layers, [float(len(layers) - i) for i in layers])
        write_scores_json(folder / "scores.json", "tiny", {"reverse-order": scores})
    (run / "config.yaml").write_text("model: tiny\n")
    mark_output_dir(run)  # as `layerprune run` marks its folder: report rewrites only folders layerprune made
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert is_png(run / "layer_map.png") and is_png(run / "loss_curves.png")
    assert is_png(run / "rounds" / "round-1" / "scores.png")
    assert "round-1: 4; round-2: 3" in (run / "report.md").read_text()


def test_report_of_a_study_folder_is_delegated(tmp_path, monkeypatch):
    import layerprune.report.rebuild

    (tmp_path / "study.json").write_text("{}")
    mark_output_dir(tmp_path)
    calls = []
    monkeypatch.setattr(layerprune.report.rebuild, "rebuild_study_report",
                        lambda folder: calls.append(folder) or {"plots": [str(tmp_path / "plots" / "x.png")]})
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert calls == [tmp_path] and "x.png" in result.output


def test_study_report_plots_the_similarity_json_without_loading_models(tmp_path):
    import json

    (tmp_path / "settings" / "metric-a").mkdir(parents=True)
    (tmp_path / "study.json").write_text(json.dumps({
        "source": "s.yaml", "axes": ["metric"], "report": {"similarity": True},
        "settings": [{"name": "metric-a", "values": {"metric": "a"}, "dir": "settings/metric-a", "status": "done"}]}))
    (tmp_path / "similarity.json").write_text(json.dumps({"names": ["original", "metric-a"],
                                                          "cka": [[1.0, 0.8], [0.8, 1.0]]}))
    record = rebuild_study_report(tmp_path)
    heatmap = tmp_path / "plots" / "similarity.png"
    assert record["plots"] == [str(heatmap)] and is_png(heatmap)
    assert (tmp_path / "study.md").read_text().splitlines()[2].startswith("| metric-a | a |")


def test_report_of_a_folder_that_is_neither(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(runner.invoke(app, ["report", str(tmp_path)]), "is neither a run folder")
    assert_one_line_error(runner.invoke(app, ["report", str(tmp_path / "nowhere")]), "does not exist")
