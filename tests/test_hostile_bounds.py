"""Bounded before work (docs/safety.md): numbers that are not finite, out of range or unreadable, unknown
names and a cache path that is a file are one `error:` line naming the option, before any model loads."""

import pytest
from typer.testing import CliRunner

from layerprune.cli import app
from cli_asserts import assert_one_line_error
from test_pipeline import make_workspace

runner = CliRunner()


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    return make_workspace(tmp_path)


def finetune(workspace, *args):
    return runner.invoke(app, ["finetune", str(workspace / "tiny"), "--out", str(workspace / "healed"), "--data",
                               str(workspace / "sft.jsonl"), "--method", "lora", "--max-steps", "1", *args])


@pytest.mark.parametrize("value, fragment", [("inf", "finite"), ("nan", "finite"), ("1e308", "less than or equal"),
                                             ("0", "greater than 0")])
def test_a_time_budget_that_is_not_a_finite_positive_number_is_refused(workspace, value, fragment):
    result = finetune(workspace, "--max-minutes", value)
    assert_one_line_error(result, "--max-minutes")
    assert fragment in result.stderr
    assert sorted(p.name for p in workspace.iterdir()) == ["sft.jsonl", "text.txt", "tiny"]  # nothing made


@pytest.mark.parametrize("args, fragment", [
    (["--batch-size", "0"], "--batch-size: Input should be greater than or equal to 1 (got 0)"),
    (["--max-length", "-5"], "--max-length: Input should be greater than or equal to 8 (got -5)"),
    (["--method", "nosuch"], "--method: unknown healing method 'nosuch'"),
    (["--ppl-windows", "-1"], "--ppl-windows: Input should be greater than or equal to 0 (got -1)"),
    (["--gpu-memory", "1.2.3GB"], "cannot read the memory size '1.2.3GB'"),
    (["--gpus", "2", "--gpu-memory", "0GB"], "cannot read the memory size '0GB'"),
    (["--gpus", "2", "--gpu-memory", "9" * 400 + "GB"], "cannot read the memory size"),
])
def test_plan_refuses_bad_settings_in_one_line(workspace, args, fragment):
    assert_one_line_error(runner.invoke(app, ["plan", str(workspace / "tiny"), *args]), fragment)


def test_plan_still_reads_a_good_memory_size(workspace):
    result = runner.invoke(app, ["plan", str(workspace / "tiny"), "--gpus", "2", "--gpu-memory", "24.5GB", "--json"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("data, fragment", [
    ("c4:-1", "the weight of 'c4' in the data mix 'c4:-1' must be a positive number"),
    ("c4:0", "must be a positive number"),
    ("c4:inf", "must be a positive number"),
])
def test_a_bad_weight_on_a_single_source_is_named_as_a_weight(workspace, data, fragment):
    result = runner.invoke(app, ["finetune", str(workspace / "tiny"), "--out", str(workspace / "healed"), "--data",
                                 data, "--method", "cpt", "--max-steps", "1"])
    assert_one_line_error(result, fragment)


@pytest.mark.parametrize("inside", [False, True])
def test_a_cache_path_that_is_a_file_is_refused_before_any_work(workspace, monkeypatch, inside):
    cache = workspace / "sft.jsonl"
    before = cache.read_bytes()
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(cache / "sub" if inside else cache))
    result = runner.invoke(app, ["plan", str(workspace / "tiny")])
    assert_one_line_error(result, "is not a folder")
    assert "LAYERPRUNE_CACHE" in result.stderr and cache.read_bytes() == before


@pytest.mark.parametrize("missing, what", [("num_hidden_layers", "no layer count"), ("hidden_size", "no hidden size")])
@pytest.mark.parametrize("command", ["plan", "info"])
def test_a_config_without_its_shape_is_refused_not_planned_as_a_default_model(workspace, missing, what, command):
    import json

    path = workspace / "tiny" / "config.json"
    config = json.loads(path.read_text())
    del config[missing]
    path.write_text(json.dumps(config))
    assert_one_line_error(runner.invoke(app, [command, str(workspace / "tiny")]), f"config.json states {what}")
