"""`replace` and `block-local` healing one layer at a time equal the in-memory ones and write a stock checkpoint."""

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from cli_asserts import assert_one_line_error
from layerprune import remove_layers, save_model
from layerprune.api import finetune_model
from layerprune.cli import app
from numerics import approx_value
from tiny_models import CORPUS, tiny_model, tiny_tokenizer

runner = CliRunner()
DROP = [1, 3]  # two cuts: the second sees the first one healed


def workspace(family, tmp_path, method="replace"):
    tokenizer = tiny_tokenizer()
    save_model(tiny_model(family), tokenizer, tmp_path / "teacher")
    pruned = remove_layers(tiny_model(family), DROP)
    save_model(pruned, tokenizer, tmp_path / "pruned")
    (tmp_path / "text.txt").write_text(CORPUS)
    return dict(method=method, data=str(tmp_path / "text.txt"), teacher=str(tmp_path / "teacher"),
                max_length=32, batch_size=4, max_samples=12, max_steps=6, learning_rate=1e-3)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(folder.glob("*.safetensors")):
        found.update(load_file(file))
    return found


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("method", ["replace", "block-local"])
def test_streamed_healing_equals_the_in_memory_one(family, method, tmp_path):
    settings = workspace(family, tmp_path, method)
    finetune_model(str(tmp_path / "pruned"), out=str(tmp_path / "memory"), **settings)
    finetune_model(str(tmp_path / "pruned"), out=str(tmp_path / "streamed"), streaming=True, **settings)
    memory, streamed, before = (tensors(tmp_path / name) for name in ("memory", "streamed", "pruned"))
    assert memory.keys() == streamed.keys() == before.keys()
    changed = sorted(name for name in before if not torch.equal(before[name], streamed[name]))
    assert len(changed) >= 2 and all("layers.0." in n or "layers.1." in n or "h.0." in n or "h.1." in n
                                     for n in changed)  # the MLP outputs of the kept layers before both cuts
    for name in streamed:
        torch.testing.assert_close(streamed[name], memory[name], atol=1e-5, rtol=0)
    notes = json.loads((tmp_path / "streamed" / "heal.json").read_text())["notes"]
    assert [c["cut"] for c in notes["cuts"]] == [[1, 1], [3, 3]] and notes["streaming"] is True
    if method == "block-local":  # the same losses, step by step
        with open(tmp_path / "memory" / "loss.csv") as f:
            memory_curve = [float(row["loss"]) for row in csv.DictReader(f)]
        assert [p["loss"] for p in notes["loss_curve"]] == approx_value(memory_curve)
        assert notes["loss_curve"][-1]["loss"] < notes["loss_curve"][0]["loss"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")  # a stock checkpoint
    assert reloaded.config.layerprune["history"][-1]["healed"] == method


def test_cli_streaming_heals_and_refuses_trained_methods(tmp_path):
    settings = workspace("llama", tmp_path)
    common = ["--data", settings["data"], "--teacher", settings["teacher"], "--max-length", "32", "--max-samples", "8"]
    result = runner.invoke(app, ["finetune", str(tmp_path / "pruned"), "--out", str(tmp_path / "healed"),
                                 "--method", "replace", "--streaming", *common])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "healed" / "heal.json").exists() and (tmp_path / "healed" / "tokenizer.json").exists()
    refused = runner.invoke(app, ["finetune", str(tmp_path / "pruned"), "--out", str(tmp_path / "other"),
                                  "--method", "distill", "--streaming", *common])
    assert_one_line_error(refused, "--streaming heals with method replace")
    assert not (tmp_path / "other").exists()
