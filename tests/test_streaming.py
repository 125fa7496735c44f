"""Scores streamed one layer at a time from a checkpoint equal the in-memory scores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.data.calibration import CalibrationData
from layerprune.errors import LayerpruneError
from layerprune.importance import compute_many
from layerprune.importance import streaming
from layerprune.importance.streaming import stream_scores
from layerprune.models.anatomy import get_anatomy
from test_checkpoint import save_unwrapped_gpt2
from tiny_models import N_LAYERS, tiny_input, tiny_model, tiny_tokenizer

hf_logging.disable_progress_bar()

REQUESTS = {
    "block-influence": {"batch_size": 2},
    "relative-magnitude": {},
    "angular": {"block_size": 2, "max_block_size": N_LAYERS},
    "magnitude-l1": {},
    "magnitude-l2": {"include_norms": True},
    "reverse-order": {},
}


def calibration() -> CalibrationData:
    """5 samples of 16 tokens, two of them right-padded (padding must stay out of every mean)."""
    ids = tiny_input(batch=5, length=16)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    mask[3, 13:] = 0
    return CalibrationData(ids, mask, {"source": "test", "n_samples": 5})


def assert_same_scores(streamed, in_memory):
    assert list(streamed) == list(in_memory)
    for name in in_memory:
        a, b = streamed[name], in_memory[name]
        assert (a.metric, a.layers, a.params, a.calibration) == (b.metric, b.layers, b.params, b.calibration), name
        torch.testing.assert_close(
            torch.tensor(a.values, dtype=torch.float64), torch.tensor(b.values, dtype=torch.float64),
            rtol=1e-5, atol=0, equal_nan=True, msg=name,
        )
        assert a.extra.keys() == b.extra.keys(), name
        if "distances" in b.extra:
            for m, row in b.extra["distances"].items():
                torch.testing.assert_close(torch.tensor(a.extra["distances"][m]), torch.tensor(row), rtol=1e-5, atol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gpt2", "qwen2", "opt"])
def test_streamed_scores_equal_in_memory_scores(family, tmp_path):
    tiny_model(family).save_pretrained(tmp_path, max_shard_size="20KB")
    calib = calibration()
    reference = compute_many(AutoModelForCausalLM.from_pretrained(tmp_path).eval(), REQUESTS, calib)
    assert_same_scores(stream_scores(tmp_path, calib, REQUESTS), reference)


def test_one_layer_in_memory_at_a_time(tmp_path, monkeypatch):
    tiny_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    built, seen = {}, []
    make_skeleton, run_layer = streaming.skeleton, streaming.observe_layer

    def spy_skeleton(*args):
        built["model"] = make_skeleton(*args)
        return built["model"]

    def spy_run_layer(block, i, batches, acc):
        model = built["model"]
        layers = get_anatomy(model).layers
        real = [j for j, layer in enumerate(layers) if any(not p.is_meta for p in layer.parameters())]
        seen.append((real, get_anatomy(model).embeddings.weight.is_meta))
        return run_layer(block, i, batches, acc)

    monkeypatch.setattr(streaming, "skeleton", spy_skeleton)
    monkeypatch.setattr(streaming, "observe_layer", spy_run_layer)
    stream_scores(tmp_path, calibration(), ["block-influence"])
    assert seen == [([i], True) for i in range(N_LAYERS)]
    assert all(p.is_meta for p in built["model"].parameters())


def test_gpt2_checkpoint_without_the_transformer_prefix_streams(tmp_path):
    model = tiny_model("gpt2")
    save_unwrapped_gpt2(model, tmp_path)
    requests = {"block-influence": {}, "magnitude-l2": {}}
    assert_same_scores(stream_scores(tmp_path, calibration(), requests), compute_many(model, requests, calibration()))


def test_pruned_checkpoint_scores_speak_original_indices(tmp_path):
    from layerprune.models.checkpoint import prune_checkpoint

    tiny_model("llama").save_pretrained(tmp_path / "src")
    prune_checkpoint(tmp_path / "src", [1, 3], tmp_path / "pruned")
    scores = stream_scores(tmp_path / "pruned", calibration(), ["block-influence"])
    assert scores["block-influence"].layers == [0, 2, 4]


@pytest.mark.parametrize("metric, fragment", [("perplexity", "one layer at a time"), ("taylor", "one layer at a time"),
                                              ("no-such-metric", "unknown metric")])
def test_metrics_that_need_the_whole_model_are_refused(metric, fragment, tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(LayerpruneError, match=fragment):
        stream_scores(tmp_path, calibration(), [metric])


def test_missing_calibration_is_refused(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "llama")
    with pytest.raises(LayerpruneError, match="needs calibration data"):
        stream_scores(tmp_path / "llama", None, ["block-influence"])


@pytest.mark.integration
def test_cli_score_streaming_writes_the_same_scores(tmp_path):
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir, max_shard_size="20KB")
    tiny_tokenizer().save_pretrained(model_dir)
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(f"document {i}: the quick brown fox jumps over the lazy dog." for i in range(40)))
    runner = CliRunner()
    common = ["--metric", "block-influence,magnitude-l1", "--calib", str(text), "--n-samples", "3", "--seq-len", "24"]
    for out, extra in (("memory", []), ("streamed", ["--streaming"])):
        result = runner.invoke(app, ["score", str(model_dir), "--out", str(tmp_path / out), *common, *extra])
        assert result.exit_code == 0, result.output
    memory, streamed = (read_scores(tmp_path / out) for out in ("memory", "streamed"))
    for name in ("block-influence", "magnitude-l1"):
        assert streamed[name]["layers"] == memory[name]["layers"] == list(range(N_LAYERS))
        a, b = torch.tensor(streamed[name]["values"]), torch.tensor(memory[name]["values"])
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def read_scores(folder: Path) -> dict:
    return json.loads((folder / "scores.json").read_text())["scores"]
