"""The command line: a working prune, and one clear error line (exit 1, nothing written) for each bad input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.cli.options import parse_indices
from layerprune.models.saving import save_model
from tiny_models import N_LAYERS, tiny_config, tiny_model
from cli_asserts import assert_one_line_error

runner = CliRunner()


@pytest.fixture
def tiny_dir(tmp_path):
    model = tiny_model("llama")
    save_model(model, None, tmp_path / "tiny")
    return tmp_path / "tiny"


def run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result




@pytest.mark.integration
def test_prune_writes_a_reloadable_model(tiny_dir, tmp_path):
    result = run("prune", tiny_dir, "--drop", "1,3", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.num_hidden_layers == N_LAYERS - 2
    assert json.loads((tmp_path / "out" / "layerprune.json").read_text())["dropped_layers"] == [1, 3]


@pytest.mark.integration
def test_prune_by_metric_drops_the_last_layers(tiny_dir, tmp_path):
    result = run("prune", tiny_dir, "--num-layers", "2", "--metric", "reverse-order", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "layerprune.json").read_text())
    assert record["dropped_layers"] == [N_LAYERS - 2, N_LAYERS - 1]


@pytest.mark.integration
def test_info_shows_layers_and_parameters(tiny_dir):
    result = run("info", tiny_dir)
    assert result.exit_code == 0, result.output
    assert "LlamaForCausalLM" in result.output and f"{N_LAYERS} (original {N_LAYERS})" in result.output


@pytest.mark.integration
def test_existing_output_is_refused_and_kept(tiny_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert_one_line_error(run("prune", tiny_dir, "--drop", "1", "--out", out), "already exists")
    assert_one_line_error(run("prune", tiny_dir, "--drop", "1", "--out", out, "--overwrite"),
                          "was not written by layerprune")
    assert sorted(p.name for p in out.iterdir()) == ["precious.txt"]
    assert (out / "precious.txt").read_text() == "keep me"


def test_overwrite_replaces_an_output_layerprune_wrote(tiny_dir, tmp_path):
    out = tmp_path / "out"
    assert run("prune", tiny_dir, "--drop", "1", "--out", out).exit_code == 0
    assert run("prune", tiny_dir, "--drop", "2", "--out", out, "--overwrite").exit_code == 0
    assert json.loads((out / "layerprune.json").read_text())["dropped_layers"] == [2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"], "nothing left beside the output"


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--drop", "9"], "out of range"),
        (["--drop", "1,1"], "duplicate"),
        (["--drop", f"0-{N_LAYERS - 1}"], "cannot drop all"),
        (["--drop", "a,b"], "could not read layer indices"),
        (["--num-layers", str(N_LAYERS)], "at least one must stay"),
        (["--num-layers", "1", "--metric", "nonsense"], "unknown metric"),
        (["--ratio", "1.5"], "--ratio: Input should be less than 1 (got 1.5)"),
        ([], "exactly one of"),
        (["--drop", "1", "--num-layers", "1"], "exactly one of"),
        (["--drop", "1", "--dtype", "fp8"], "unknown dtype"),
    ],
)
def test_bad_prune_arguments(tiny_dir, tmp_path, args, fragment):
    out = tmp_path / "out"
    assert_one_line_error(run("prune", tiny_dir, *args, "--out", out), fragment)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"], "no temporary folders left behind"


def test_missing_model_path(tmp_path):
    assert_one_line_error(run("info", tmp_path / "nowhere"), "model not found")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert_one_line_error(run("info", tmp_path), "not a model folder")


def test_unsupported_architecture(tmp_path):
    from transformers import T5Config

    T5Config(d_model=32, num_layers=2, num_heads=4, d_ff=64).save_pretrained(tmp_path)
    assert_one_line_error(run("info", tmp_path), "unsupported architecture 't5'")


def test_parse_indices_accepts_ranges():
    assert parse_indices("3, 5,10-12") == [3, 5, 10, 11, 12]
