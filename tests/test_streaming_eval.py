"""Perplexity of a checkpoint on disk one layer at a time equals the in-memory perplexity."""

import json

import pytest
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from cli_asserts import assert_one_line_error
from layerprune.cli import app
from layerprune.evaluation.perplexity import perplexity, streaming_perplexity
from layerprune.models.anatomy import get_anatomy
from numerics import approx_value, per_token
from tiny_models import CORPUS, N_LAYERS, tiny_model, tiny_tokenizer

runner = CliRunner()


def saved(family, folder):
    tiny_model(family).save_pretrained(folder, max_shard_size="20KB")  # many shards: layers are read one by one
    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "qwen2", "opt"])
def test_streamed_perplexity_equals_the_in_memory_one(family, tmp_path):
    folder = saved(family, tmp_path)
    tokenizer = tiny_tokenizer()
    expected = perplexity(AutoModelForCausalLM.from_pretrained(folder).eval(), tokenizer, CORPUS, seq_len=16,
                          max_windows=7, batch_size=3, progress=False)
    streamed = streaming_perplexity(str(folder), tokenizer, CORPUS, seq_len=16, max_windows=7, batch_size=3,
                                    progress=False)
    assert streamed["tokens"] == expected["tokens"] == 7 * 15  # no BOS: the first token of each window is context
    assert per_token(streamed["nll_sum"], 7 * 15) == approx_value(per_token(expected["nll_sum"], 7 * 15))
    assert streamed["streaming"] is True


def test_only_one_layer_is_in_memory_at_a_time(tmp_path, monkeypatch):
    import layerprune.models.layer_stream as layer_stream

    folder = saved("llama", tmp_path)
    seen = []
    run_layer, make_skeleton, built = layer_stream.run_layer, layer_stream.skeleton, {}

    def spy_skeleton(*args):
        built["model"] = make_skeleton(*args)
        return built["model"]

    def spy_run_layer(block, i, batches):
        layers = get_anatomy(built["model"]).layers
        seen.append([j for j, layer in enumerate(layers) if any(not p.is_meta for p in layer.parameters())])
        return run_layer(block, i, batches)

    monkeypatch.setattr(layer_stream, "skeleton", spy_skeleton)
    monkeypatch.setattr(layer_stream, "run_layer", spy_run_layer)
    streaming_perplexity(str(folder), tiny_tokenizer(), CORPUS, seq_len=16, max_windows=3, progress=False)
    assert seen == [[i] for i in range(N_LAYERS)]
    assert all(p.is_meta for p in built["model"].parameters())  # everything went back to disk


def test_cli_eval_streaming_writes_the_same_perplexity(tmp_path):
    folder = saved("qwen2", tmp_path / "model")
    (tmp_path / "text.txt").write_text(CORPUS)
    common = ["--tasks", "none", "--ppl", str(tmp_path / "text.txt"), "--seq-len", "16", "--ppl-windows", "5",
              "--no-samples"]
    for out, extra in (("memory", []), ("streamed", ["--streaming"])):
        result = runner.invoke(app, ["eval", str(folder), "--out", str(tmp_path / out), *common, *extra])
        assert result.exit_code == 0, result.output
    memory = json.loads((tmp_path / "memory" / "eval.json").read_text())["perplexity"]
    streamed = json.loads((tmp_path / "streamed" / "eval.json").read_text())["perplexity"]
    (name,) = memory
    tokens = memory[name]["tokens"]
    assert per_token(streamed[name]["nll_sum"], tokens) == approx_value(per_token(memory[name]["nll_sum"], tokens))
    assert streamed[name]["streaming"] is True


def test_cli_eval_streaming_refuses_tasks_in_one_line(tmp_path):
    folder = saved("llama", tmp_path / "model")
    result = runner.invoke(app, ["eval", str(folder), "--out", str(tmp_path / "out"), "--tasks", "piqa", "--streaming"])
    assert_one_line_error(result, "pass --tasks none")
    assert not (tmp_path / "out").exists()
