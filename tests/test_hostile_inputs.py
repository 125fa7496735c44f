"""Hostile inputs: lying safetensors headers on the disk path, configs that describe absurd models, grids and
values that would never end, and every other mistake a user can make: one `error:` line each, checked
before any work, and nothing written (docs/safety.md)."""

import json
import struct
import time

import pytest
import yaml
from typer.testing import CliRunner

from layerprune import save_model
from layerprune.cli import app
from cli_asserts import assert_one_line_error
from tiny_models import tiny_model, tiny_tokenizer

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "model"
    save_model(tiny_model("llama"), tiny_tokenizer(), folder)
    return folder


# ------------------------------------------------------------------ prune --no-load: headers that lie
def rewrite_header(folder, change):
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8:8 + size]), raw[8 + size:]
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def layer_weight(header, layer, part="mlp.up_proj.weight"):
    return header[f"model.layers.{layer}.{part}"]


def dtype_lie(h):
    layer_weight(h, 0)["dtype"] = "F16"  # same bytes read as twice the elements: the shape no longer fits


def shape_larger(h):
    entry = layer_weight(h, 0)
    entry["shape"] = [entry["shape"][0] * 2, entry["shape"][1]]


def shape_smaller(h):
    entry = layer_weight(h, 0)
    entry["shape"] = [entry["shape"][0] // 2, entry["shape"][1]]


def overlapping(h):
    layer_weight(h, 2)["data_offsets"] = list(layer_weight(h, 1)["data_offsets"])  # layer 1's bytes, twice


def absurd_shape(h):
    layer_weight(h, 0)["shape"] = [2**40, 2**40]


def unknown_dtype(h):
    layer_weight(h, 0)["dtype"] = "Q7"


@pytest.mark.parametrize("lie, fragment", [
    (dtype_lie, "bytes, but its header gives it"), (shape_larger, "bytes, but its header gives it"),
    (shape_smaller, "bytes, but its header gives it"), (overlapping, "overlaps"), (absurd_shape, "absurd shape"),
    (unknown_dtype, "unknown dtype"),
])
def test_prune_no_load_refuses_a_lying_header_before_writing(model, tmp_path, lie, fragment):
    rewrite_header(model, lie)
    result = invoke("prune", model, "--no-load", "--drop", "1", "--out", tmp_path / "out")
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "layerprune-tmp" in p.name]


# ------------------------------------------------------------------ configs: limits before work
def edit_config(folder, **changes):
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, fragment", [
    ({"num_hidden_layers": 1_000_000_000}, "num_hidden_layers is 1,000,000,000, outside"),
    ({"num_hidden_layers": 50_000}, "it says 50,000 layers, the weight files hold layers 0 to 4"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"num_hidden_layers": 4.0}, "num_hidden_layers must be a whole number"),
    ({"num_hidden_layers": "4"}, "num_hidden_layers must be a whole number"),
    ({"layer_types": ["full_attention"] * 3}, "layer_types has 3 entries for 5 layers"),
    ({"hidden_size": 900_000, "intermediate_size": 9_000_000}, "does not match the weights"),
])
@pytest.mark.parametrize("command", [["info"], ["prune", "--drop", "1", "--out", "{tmp}/out"],
                                     ["prune", "--no-load", "--drop", "1", "--out", "{tmp}/out"]])
def test_an_absurd_config_is_refused_in_a_moment(model, tmp_path, changes, fragment, command):
    edit_config(model, **changes)
    started = time.perf_counter()
    result = invoke(command[0], model, *[c.format(tmp=tmp_path) for c in command[1:]])
    assert_one_line_error(result, fragment)
    assert time.perf_counter() - started < 10
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ values and YAML
@pytest.mark.parametrize("value, fragment", [("inf", "finite number"), ("1e308", "not below the model's 5 layers")])
def test_curve_max_drop_infinite_or_huge_is_one_short_line(model, tmp_path, value, fragment):
    result = invoke("curve", model, "--max-drop", value, "--out", tmp_path / "c")
    assert_one_line_error(result, fragment)
    assert len(result.stderr) < 400, result.stderr
    assert not (tmp_path / "c").exists()


def test_search_with_a_quality_target_and_everything_protected_is_one_line(model, tmp_path):
    (tmp_path / "text.txt").write_text("the cat sat on the mat. " * 200)
    result = invoke("prune", model, "--select", "search", "--max-ppl-ratio", "2", "--protect-first", "3",
                    "--protect-last", "2", "--calib", tmp_path / "text.txt", "--n-samples", "2", "--seq-len", "16",
                    "--out", tmp_path / "out")
    assert_one_line_error(result, "cover all 5 layers")
    assert not (tmp_path / "out").exists()


def test_option_names_are_not_rewritten_inside_words(model, tmp_path):
    result = invoke("prune", model, "--select", "search", "--metric", "angular", "--num-layers", "1",
                    "--out", tmp_path / "out")
    assert_one_line_error(result, "ranks drop-sets")
    assert "--drop-sets" not in result.stderr


def run_yaml(tmp_path, model, **data):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": str(model), "out": str(tmp_path / "run"),
                                    "prune": {"drop": [1]}, "heal": [], "eval": None, "bench": None, **data}))
    return path


def test_run_set_into_a_value_is_one_line(model, tmp_path):
    result = invoke("run", run_yaml(tmp_path, model), "--set", "model.a=1")
    assert_one_line_error(result, "model is a value")
    assert not (tmp_path / "run").exists()


def test_a_yaml_anchor_bomb_gives_a_short_error(model, tmp_path):
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, "
              f"*a{i - 1}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + f"\nmodel: {model}\nprune: {{drop: *a8}}\n")
    result = invoke("run", path)
    assert_one_line_error(result, "drop")
    assert len(result.stderr) < 3000
    assert not (tmp_path / "runs").exists()


def test_a_grid_of_too_many_settings_is_refused_with_the_count(model, tmp_path):
    grid = {f"prune.metric_params.m{i}.x": list(range(10)) for i in range(8)}
    path = run_yaml(tmp_path, model, grid=grid)
    started = time.perf_counter()
    result = invoke("run", path)
    assert_one_line_error(result, "100,000,000 settings")
    assert time.perf_counter() - started < 10


def test_eval_compare_without_a_common_task_is_one_line(tmp_path):
    for name, task in (("a", "piqa"), ("b", "arc_easy")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({
            "tasks": {task: {"acc": 0.5}}, "average": {"metric": "acc", "value": 0.5}, "perplexity": {}}))
    result = invoke("eval-compare", tmp_path / "a", tmp_path / "b")
    assert_one_line_error(result, "no task or perplexity set in common")


def test_eval_compare_notes_averages_over_other_tasks(tmp_path):
    for name, tasks in (("a", ["piqa", "arc_easy"]), ("b", ["piqa"])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({
            "tasks": {t: {"acc": 0.5} for t in tasks}, "average": {"metric": "acc", "value": 0.5}, "perplexity": {}}))
    result = invoke("eval-compare", tmp_path / "a", tmp_path / "b")
    assert result.exit_code == 0, result.output
    assert "Avg Acc averages other tasks" in result.output and "arc_easy" in result.output


MODEL_RECORD = {"architecture": "LlamaForCausalLM", "layers": 5, "original_layers": 5, "parameters": 1, "dtype": "fp32"}


def test_eval_compare_out_onto_a_dangling_symlink_needs_overwrite(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "eval.json").write_text(json.dumps({"model": MODEL_RECORD, "tasks": {"piqa": {"acc": 0.5}},
                                                          "perplexity": {}}))
    (tmp_path / "cmp.md").symlink_to(tmp_path / "elsewhere.md")
    result = invoke("eval-compare", tmp_path / "a", tmp_path / "a", "--out", tmp_path / "cmp.md")
    assert_one_line_error(result, "already exists")
    assert not (tmp_path / "elsewhere.md").exists()
    result = invoke("eval-compare", tmp_path / "a", tmp_path / "a", "--out", tmp_path / "cmp.md", "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "elsewhere.md").exists() and not (tmp_path / "cmp.md").is_symlink()


def test_eval_tasks_naming_a_folder_says_so(model, tmp_path):
    (tmp_path / "tasks").mkdir()
    result = invoke("eval", model, "--tasks", f"{tmp_path / 'tasks'}/", "--out", tmp_path / "e")
    assert_one_line_error(result, "is a folder")
