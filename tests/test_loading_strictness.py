"""Loading is strict and runs no code from a model folder unless asked.

- a folder whose config or tokenizer ships Python code (auto_map) is refused with one error naming
  --trust-remote-code, even when "y" waits on stdin; with the flag (or a run's trust_remote_code) it loads
  and layerprune.json records it;
- a checkpoint whose weights don't fill its config (missing, extra or reshaped decoder weights), an
  encoder such as BERT, and a tokenizer that is there but can't be read are refused (--no-tokenizer opts
  out of the tokenizer); pruning on disk copies linked files only from inside the model folder.
"""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.models.loading import load_model, loading_options
from tiny_models import N_LAYERS, tiny_model
from cli_asserts import assert_one_line_error

runner = CliRunner()


def run(*args, input=None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


# ------------------------------------------------------------------ remote code

REMOTE_CODE = """\
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


class MarkedConfig(LlamaConfig):
    model_type = {model_type!r}


class MarkedModel(LlamaForCausalLM):
    config_class = MarkedConfig


class MarkedTokenizer(PreTrainedTokenizerFast):
    pass
"""


def with_remote_code(folder, marker, *, tokenizer: bool = False):
    """A model folder whose config (or tokenizer) asks transformers to import marked.py, which writes `marker`."""
    model_type = f"lp_marked_{abs(hash(str(folder))) % 10**8}"  # one module per test: imports are cached
    (folder / "marked.py").write_text(REMOTE_CODE.format(marker=str(marker), model_type=model_type))
    if tokenizer:
        edit_json(folder / "tokenizer_config.json", tokenizer_class="MarkedTokenizer",
                  auto_map={"AutoTokenizer": [None, "marked.MarkedTokenizer"]})
    else:
        edit_json(folder / "config.json", model_type=model_type,
                  auto_map={"AutoConfig": "marked.MarkedConfig", "AutoModelForCausalLM": "marked.MarkedModel"})
    return folder


@pytest.mark.parametrize("command", [["info"], ["prune", "--drop", "1", "--out", "OUT"]])
@pytest.mark.parametrize("stdin", [None, "y\ny\ny\n"])
def test_a_folder_with_its_own_code_is_refused_without_running_it(tiny_dir, tmp_path, command, stdin):
    marker = tmp_path / "MARKER"
    with_remote_code(tiny_dir, marker)
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    result = run(args[0], tiny_dir, *args[1:], input=stdin)
    assert_one_line_error(result, "--trust-remote-code")
    assert "auto_map" in result.stderr
    assert not marker.exists(), "the folder's code ran"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["info", "prune", "score", "finetune", "eval", "bench", "export", "generate"])
def test_every_command_that_loads_a_model_takes_trust_remote_code(command):
    import typer.main

    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    assert params["trust_remote_code"].opts == ["--trust-remote-code"] and params["trust_remote_code"].default is False


def test_a_tokenizer_with_its_own_code_is_refused_without_running_it(tiny_dir, tmp_path):
    marker = tmp_path / "MARKER"
    with_remote_code(tiny_dir, marker, tokenizer=True)
    result = run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out", input="y\n")
    assert_one_line_error(result, "--trust-remote-code")
    assert "tokenizer" in result.stderr
    assert not marker.exists()


def test_export_refuses_a_tokenizer_with_its_own_code(tiny_dir, tmp_path):
    # llama.cpp's converter loads tokenizers with trust_remote_code=True: refused before it starts
    marker = tmp_path / "MARKER"
    with_remote_code(tiny_dir, marker, tokenizer=True)
    result = run("export", tiny_dir, "--out", tmp_path / "model.gguf")
    assert_one_line_error(result, "--trust-remote-code")
    assert not marker.exists() and not (tmp_path / "model.gguf").exists()


def test_trust_remote_code_runs_it_and_is_recorded(tiny_dir, tmp_path):
    marker = tmp_path / "MARKER"
    with_remote_code(tiny_dir, marker)
    result = run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out", "--trust-remote-code")
    assert result.exit_code == 0, result.output
    assert marker.exists()
    assert json.loads((tmp_path / "out" / "layerprune.json").read_text())["trust_remote_code"] is True


def test_a_run_yaml_opts_in_at_its_top_level(tiny_dir, tmp_path):
    marker = tmp_path / "MARKER"
    with_remote_code(tiny_dir, marker)
    config = {"model": str(tiny_dir), "out": str(tmp_path / "run"), "prune": {"drop": [1]}}
    (tmp_path / "refused.yaml").write_text(yaml.safe_dump(config))
    assert_one_line_error(run("run", tmp_path / "refused.yaml"), "--trust-remote-code")
    assert not marker.exists()

    (tmp_path / "trusted.yaml").write_text(yaml.safe_dump({**config, "trust_remote_code": True}))
    result = run("run", tmp_path / "trusted.yaml")
    assert result.exit_code == 0, result.output
    assert marker.exists()
    assert json.loads((tmp_path / "run" / "pruned" / "layerprune.json").read_text())["trust_remote_code"] is True


def test_an_ordinary_model_records_that_no_code_was_trusted(tiny_dir, tmp_path):
    assert run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out").exit_code == 0
    assert json.loads((tmp_path / "out" / "layerprune.json").read_text())["trust_remote_code"] is False


def test_the_api_takes_trust_remote_code_as_an_argument_or_a_context(tiny_dir, tmp_path):
    marker = tmp_path / "MARKER"
    with_remote_code(tiny_dir, marker)
    with pytest.raises(LayerpruneError, match="--trust-remote-code"):
        load_model(tiny_dir)
    assert not marker.exists()
    with loading_options(trust_remote_code=True):
        loaded = load_model(tiny_dir)
    assert marker.exists() and type(loaded.model).__name__ == "MarkedModel"
    with pytest.raises(LayerpruneError, match="--trust-remote-code"):
        load_model(tiny_dir)  # the context ended


# ------------------------------------------------------------------ weights that don't fill the config


def test_a_config_with_more_layers_than_the_weights_is_refused(tiny_dir, tmp_path):
    edit_json(tiny_dir / "config.json", num_hidden_layers=N_LAYERS + 2)
    for args in (["info", tiny_dir], ["prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out"]):
        result = run(*args)
        assert_one_line_error(result, "lacks weights")
        assert f"layers [{N_LAYERS}, {N_LAYERS + 1}]" in result.stderr  # from the file headers, before building
    assert not (tmp_path / "out").exists()
    # on disk, too: the layer tensors are checked against the config
    assert_one_line_error(run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out", "--no-load"),
                          f"no tensor for layers [{N_LAYERS}, {N_LAYERS + 1}]")


def test_a_config_with_fewer_layers_than_the_weights_is_refused(tiny_dir, tmp_path):
    edit_json(tiny_dir / "config.json", num_hidden_layers=N_LAYERS - 2)
    result = run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out")
    assert_one_line_error(result, "stores decoder weights")
    assert f"layers {N_LAYERS - 2}, {N_LAYERS - 1}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_weights_of_another_shape_are_refused(tiny_dir):
    edit_json(tiny_dir / "config.json", intermediate_size=48)
    result = run("info", tiny_dir)
    assert_one_line_error(result, "other shapes")
    assert "(32, 64)" in result.stderr


def test_a_missing_weight_outside_the_layers_is_refused(tiny_dir):
    weights = load_file(tiny_dir / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, tiny_dir / "model.safetensors", metadata={"format": "pt"})
    assert_one_line_error(run("info", tiny_dir), "model.norm.weight")


def test_an_encoder_is_refused(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    result = run("prune", tmp_path / "bert", "--drop", "1", "--out", tmp_path / "out")
    assert_one_line_error(result, "is an encoder (bert")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ tokenizers


def test_a_corrupt_tokenizer_is_an_error_and_no_tokenizer_opts_out(tiny_dir, tmp_path):
    (tiny_dir / "tokenizer.json").write_text('{"version": ')
    result = run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out")
    assert_one_line_error(result, "tokenizer.json")
    assert "--no-tokenizer" in result.stderr and not (tmp_path / "out").exists()

    result = run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out", "--no-tokenizer")
    assert result.exit_code == 0, result.output
    assert not list((tmp_path / "out").glob("tokenizer*"))
    assert load_model(tmp_path / "out").model.config.num_hidden_layers == N_LAYERS - 1


def test_a_weights_only_folder_still_prunes_and_keeps_its_tokenizer_when_it_has_one(tiny_dir, tmp_path):
    assert run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "with").exit_code == 0
    assert load_model(tmp_path / "with").tokenizer is not None
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tiny_dir / name).unlink(missing_ok=True)
    assert run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "without").exit_code == 0
    assert load_model(tmp_path / "without").tokenizer is None


def test_no_load_without_tokenizer_copies_no_tokenizer_file(tiny_dir, tmp_path):
    result = run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out", "--no-load", "--no-tokenizer")
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "generation_config.json", "layerprune.json", "model.safetensors"} <= names
    assert not [n for n in names if n.startswith(("tokenizer", "chat_template"))], names


def test_no_load_follows_links_only_inside_the_model_folder(tiny_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any model")
    (tiny_dir / "tokenizer.model").symlink_to(secret)
    result = run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out", "--no-load")
    assert_one_line_error(result, "outside the model folder")
    assert not (tmp_path / "out").exists()

    (tiny_dir / "tokenizer.model").unlink()
    (tiny_dir / "LICENSE").write_text("licence text")
    (tiny_dir / "LICENSE.txt").symlink_to(tiny_dir / "LICENSE")  # inside: followed
    assert run("prune", tiny_dir, "--drop", "1", "--out", tmp_path / "out", "--no-load").exit_code == 0
    copied = tmp_path / "out" / "LICENSE.txt"
    assert not copied.is_symlink() and copied.read_text() == "licence text"


def test_hub_cache_snapshots_may_link_into_their_blobs(tiny_dir, tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in tiny_dir.iterdir():
        blob = repo / "blobs" / f"blob-{path.name}"
        path.rename(blob)
        (snapshot / path.name).symlink_to(blob)
    result = run("prune", snapshot, "--drop", "1", "--out", tmp_path / "out", "--no-load")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "tokenizer.json").read_text() == (repo / "blobs" / "blob-tokenizer.json").read_text()
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["model.norm.weight"],
                       load_file(snapshot / "model.safetensors")["model.norm.weight"])
