"""Study grids on a tiny model: expansion, shared work, the paper table and its plots."""

import csv
import json

import pytest
import yaml

from layerprune import LayerpruneError
from layerprune.report.study_report import rebuild_study_report
from layerprune.runs.study import Study, load_study, setting_name
from layerprune.runs.study.similarity import similarity_stage
from test_pipeline import workspace, write_config  # noqa: F401  (fixture + config writer)


def study_yaml(workspace, **grid_and_overrides):
    path = write_config(workspace, bench=None)
    data = yaml.safe_load(path.read_text())
    data["prune"] = {"metric": "block-influence", "num_layers": 2}
    data["out"] = str(workspace / "study")
    data.update(grid_and_overrides)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_grid_expands_with_aliases_and_dotted_keys(workspace):
    path = study_yaml(workspace, grid={"metric": ["block-influence", "reverse-order"],
                                       "strategy": ["one-shot", "1:1:2"], "heal.0.learning_rate": [0.01]})
    study = load_study(path)
    assert len(study.settings) == 4
    configs = {s["name"]: s["config"] for s in study.settings}
    iterative = configs["metric-reverse-order__strategy-1-1-2__learning_rate-0.01"]
    assert iterative.prune.strategy == "iterative" and iterative.prune.schedule == "1:1:2"
    assert iterative.prune.metric == "reverse-order" and iterative.heal[0].learning_rate == 0.01
    assert iterative.out.endswith("settings/metric-reverse-order__strategy-1-1-2__learning_rate-0.01")
    assert configs["metric-block-influence__strategy-one-shot__learning_rate-0.01"].prune.strategy == "one-shot"


@pytest.mark.parametrize("grid, message", [
    ({"metric": ["block-influence", "nonsense"]}, "setting metric-nonsense: prune.metric: unknown metric 'nonsense'"),
    ({"metric": "block-influence"}, "grid.metric must be a non-empty list"),
    ({"heal.3.method": ["lora"]}, "key 'heal.3.method': there is no item 3"),
    ({"num_layers": [2, -1]}, "setting num_layers--1: prune.num_layers"),
])
def test_bad_grids_fail_before_anything_runs(workspace, grid, message):
    with pytest.raises(LayerpruneError, match=message):
        load_study(study_yaml(workspace, grid=grid))
    assert not (workspace / "study").exists()


@pytest.mark.integration
def test_two_by_two_grid_shares_work_and_writes_table_and_plots(workspace):
    study = load_study(study_yaml(workspace, grid={"metric": ["block-influence", "reverse-order"],
                                                   "heal_method": ["partial", "lora"]}))
    record = study.execute(log=lambda m: None)
    out = workspace / "study"
    with open(out / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["setting"] for r in rows][0] == "original"
    assert len(rows) == 1 + 4 and {r["metric"] for r in rows[1:]} == {"block-influence", "reverse-order"}
    ppl_column = next(c for c in rows[0] if c.endswith(" ppl"))
    assert all(float(r[ppl_column]) > 0 for r in rows)
    assert all(r["status"] == "done" and r["layers"] == "3" for r in rows[1:])
    reverse = [r for r in rows[1:] if r["metric"] == "reverse-order"]
    assert {r["dropped"] for r in reverse} == {"3 4"}
    md = (out / "study.md").read_text().splitlines()
    assert len(md) == 2 + 5 and "Avg Acc" not in md[0]
    assert "<table>" in (out / "study.html").read_text()
    for name in ("layer_map.png", "loss_curves.png"):
        assert (out / "plots" / name).stat().st_size > 1000, name
    # shared work: one score file per metric, one pruned model per selection, one eval of the original
    shared = sorted(p.name.rsplit("-", 1)[0] for p in (out / "shared").iterdir())
    assert shared == ["eval-original", "eval-pruned", "eval-pruned", "prune", "prune",
                      "scores-block-influence.json", "scores-reverse-order.json"]
    setting = out / "settings" / setting_name({"metric": "reverse-order", "heal_method": "lora"})
    assert (setting / "pruned").is_symlink() and (setting / "pruned" / "config.json").exists()
    assert json.loads((setting / "healed-1" / "heal.json").read_text())["method"] == "lora"
    assert len(record["rows"]) == 5

    # `layerprune report` rebuilds the table and plots from the files alone
    from typer.testing import CliRunner

    from layerprune.cli import app

    for path in (out / "study.md", out / "study.csv", out / "plots" / "layer_map.png"):
        path.unlink()
    result = CliRunner().invoke(app, ["report", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "study.csv").read_text().count("\n") == 1 + 5 and (out / "plots" / "layer_map.png").exists()

    # rerun: everything is found, nothing is recomputed
    stamp = (setting / "healed-1" / "model.safetensors").stat().st_mtime_ns
    Study(yaml.safe_load((workspace / "run.yaml").read_text()), source=str(workspace / "run.yaml")).execute(
        log=lambda m: None)
    assert (setting / "healed-1" / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.integration
def test_cli_run_dispatches_a_study(workspace):
    from typer.testing import CliRunner

    from layerprune.cli import app

    path = study_yaml(workspace, grid={"metric": ["reverse-order"], "heal_method": ["none"]},
                      eval={"tasks": "none", "ppl": str(workspace / "text.txt"), "seq_len": 32, "ppl_windows": 2, "samples": False})
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    assert "study.md" in result.output and (workspace / "study" / "study.csv").exists()


@pytest.mark.integration
def test_grid_over_layer_counts_plots_perplexity_against_layers_removed(workspace):
    study = load_study(study_yaml(workspace, heal=[], grid={"metric": ["block-influence", "reverse-order"],
                                                            "num_layers": [1, 2]}, report={"similarity": True}))
    record = study.execute(log=lambda m: None)
    out = workspace / "study"
    assert (out / "plots" / "ppl_vs_removed.png").stat().st_size > 1000
    removed = sorted(len(r["dropped"]) for r in record["rows"][1:])
    assert removed == [1, 1, 2, 2]
    # one pruned model per (metric, count), each metric scored once
    assert len(list((out / "shared").glob("prune-*"))) == 4
    assert len(list((out / "shared").glob("scores-*"))) == 2
    # linear CKA of every setting's final model against the original (and each other)
    similarity = json.loads((out / "similarity.json").read_text())
    assert similarity["names"][0] == "original" and len(similarity["names"]) == 5
    cka = similarity["cka"]
    assert all(abs(cka[i][i] - 1) < 1e-6 for i in range(5)) and all(0 < cka[0][j] < 1 for j in range(1, 5))
    assert (out / "plots" / "similarity.png").stat().st_size > 1000

    # the report only reads similarity.json: rebuilt from files, the heatmap comes back unchanged in data
    stamp = (out / "similarity.json").stat().st_mtime_ns
    (out / "plots" / "similarity.png").unlink()
    rebuild_study_report(out)
    assert (out / "plots" / "similarity.png").stat().st_size > 1000
    assert (out / "similarity.json").stat().st_mtime_ns == stamp


def test_similarity_stage_is_skipped_when_it_compares_the_same_models(tmp_path):
    path = tmp_path / "similarity.json"
    path.write_text(json.dumps({"names": ["original", "a"], "cka": [[1.0, 0.5], [0.5, 1.0]]}))
    logged = []
    similarity_stage(path, config=None, final_models={"a": "settings/a/healed-1"}, log=logged.append)
    assert logged == ["similarity.json exists: skipping"]
