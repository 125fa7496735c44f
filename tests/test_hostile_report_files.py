"""`report` reads run files as user input (docs/safety.md): a damaged or hand-edited one (wrong types, wrong
shapes) is one `error:` line naming the folder or the file, and no report.md is written from it."""

import json

import pytest
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.files.outputs import mark_output_dir
from cli_asserts import assert_one_line_error

runner = CliRunner()

DAMAGED = {
    "dropped is text": ({"selection.json": {"dropped": "abc", "chosen_by": "x"}}, "not a list of layer numbers"),
    "dropped holds a bool": ({"selection.json": {"dropped": [True], "chosen_by": "x"}}, "not a list of layer numbers"),
    "selection is a list": ({"selection.json": [1, 2]}, "selection.json holds a JSON list"),
    "stages is a list": ({"stages.json": [1]}, "stages.json holds a JSON list"),
    "run.json is a string": ({"run.json": "final"}, "run.json holds a JSON str"),
    "eval is a list": ({"eval-final/eval.json": [1]}, "eval.json holds a JSON list"),
    "loss.csv of words": ({"healed-1/loss.csv": "step,loss\nx,y\n"}, "a run file is not as layerprune wrote it"),
    "eval without its model": ({"eval-original/eval.json": {"perplexity": {"c4": {"ppl": "high"}}}},
                               "a run file is not as layerprune wrote it"),
    "tasks of numbers": ({"eval-final/eval.json": {"tasks": [1, 2]}}, "a run file is not as layerprune wrote it"),
    "candidates of numbers": ({"selection.json": {"dropped": [1], "chosen_by": "auto", "candidates": {"a": 1}}},
                              "a run file is not as layerprune wrote it"),
}


@pytest.mark.parametrize("case", list(DAMAGED))
def test_a_damaged_run_file_is_one_line_and_no_report(tmp_path, case):
    files, fragment = DAMAGED[case]
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: tiny\n")
    mark_output_dir(run)
    for name, content in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(content if isinstance(content, str) and name.endswith(".csv") else json.dumps(content))
    assert_one_line_error(runner.invoke(app, ["report", str(run)]), fragment)
    assert not (run / "report.md").exists()
