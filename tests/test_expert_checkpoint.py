"""Experts cut from a checkpoint on disk (--no-load): the same model as cutting them in memory, every kept
tensor's bytes as stored, for every MoE family, alone or after layers."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from layerprune import LayerpruneError, remove_layers
from layerprune.api import prune_model
from layerprune.cli import app
from layerprune.models.checkpoint import OutputTensor, TensorEntry, prune_checkpoint, read_checkpoint
from layerprune.models.experts.anatomy import experts_per_layer
from layerprune.models.experts.surgery import remove_experts
from tiny_models import MOE_FAMILIES, N_EXPERTS, tiny_input, tiny_moe_model


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


def saved(family, folder, **overrides):
    model = tiny_moe_model(family, **overrides)
    model.save_pretrained(folder, max_shard_size="40KB")  # several shards
    return model


def tensors(folder):
    out = {}
    for entry in read_checkpoint(folder):
        with safe_open(str(folder / entry.file), "pt") as f:
            out[entry.name] = f.get_tensor(entry.name)
    return out


def test_row_slices_are_merged_byte_ranges():
    entry = TensorEntry("w", "f", "F32", (6, 4), start=100, nbytes=6 * 16)
    cut = OutputTensor("w", entry, rows=(0, 1, 3, 4, 5))
    assert cut.shape == (5, 4) and cut.nbytes == 80 and cut.numel == 20
    assert cut.byte_ranges() == [(100, 32), (148, 48)]
    assert OutputTensor("w", entry).byte_ranges() == [(100, 96)]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_on_disk_cut_equals_the_in_memory_cut(family, tmp_path):
    model = saved(family, tmp_path / "src")
    cut = {layer: [1, N_EXPERTS - 2] for layer in experts_per_layer(model)}
    result = prune_checkpoint(tmp_path / "src", [], tmp_path / "out", drop_experts=cut)
    assert result.on_disk and result.experts["dropped"] == {str(k): v for k, v in cut.items()}
    remove_experts(model, cut)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tiny_input()
    torch.testing.assert_close(logits(reloaded, ids), logits(model, ids), rtol=0, atol=0)
    assert reloaded.config.layerprune["experts"] == model.config.layerprune["experts"]
    record = json.loads((tmp_path / "out" / "layerprune.json").read_text())
    assert record["experts"] == model.config.layerprune["experts"] and "dropped_layers" in record
    assert [step.get("dropped_experts") for step in record["history"]] == [{str(k): v for k, v in cut.items()}]
    # every tensor is its source's bytes: whole (a kept expert's own tensors under its new number), or its rows
    before, after = tensors(tmp_path / "src"), tensors(tmp_path / "out")
    kept = record["experts"]["kept"]

    def source_of(name):
        found = re.search(r"layers\.(\d+)\.(block_sparse_moe|mlp)\.experts\.(\d+)\.", name)
        if not found:
            return name
        expert = kept[found[1]][int(found[3])]
        return name.replace(f".experts.{found[3]}.", f".experts.{expert}.")

    for name, value in after.items():
        source = before[source_of(name)]
        if value.shape != source.shape:  # every expert on axis 0: the kept rows
            source = source[kept[re.search(r"layers\.(\d+)\.", name)[1]]]
        assert torch.equal(value, source), name
    assert len(after) < len(before) if family not in ("gpt_oss", "granitemoe") else len(after) == len(before)


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe", "gpt_oss"])
def test_layers_and_experts_on_disk(family, tmp_path):
    overrides = {} if family == "qwen2_moe" else {"num_hidden_layers": 3}
    if family == "deepseek_v3":
        overrides["first_k_dense_replace"] = 1
    if family == "gpt_oss":
        overrides["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    model = saved(family, tmp_path / "src", **overrides)
    prune_checkpoint(tmp_path / "src", [0], tmp_path / "out", drop_experts={2: [0, 7]} | (
        {} if family == "qwen2_moe" else {1: [3, 4]}))
    remove_layers(model, [0])
    remove_experts(model, {2: [0, 7]} | ({} if family == "qwen2_moe" else {1: [3, 4]}))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    torch.testing.assert_close(logits(reloaded, tiny_input()), logits(model, tiny_input()), rtol=0, atol=0)
    assert reloaded.config.layerprune["kept_layers"] == [1, 2]


def test_on_disk_refusals_write_nothing(tmp_path):
    saved("mixtral", tmp_path / "src")
    for cut, message in [({0: [1]}, "every MoE layer must keep as many"), ({0: [9], 1: [1]}, "out of range"),
                         ({0: list(range(7)), 1: list(range(7))}, "num_experts_per_tok=2")]:
        with pytest.raises(LayerpruneError, match=message):
            prune_checkpoint(tmp_path / "src", [], tmp_path / "out", drop_experts=cut)
        assert not (tmp_path / "out").exists()
    with pytest.raises(LayerpruneError, match="already removed"):
        prune_checkpoint(tmp_path / "src", [0], tmp_path / "out", drop_experts={0: [1], 1: [1]})


def test_prune_model_no_load_cuts_experts_on_disk(tmp_path):
    saved("olmoe", tmp_path / "src")
    result = prune_model(str(tmp_path / "src"), out=str(tmp_path / "out"), no_load=True,
                         drop_experts={0: [2, 3], 1: [4, 5]}, log=lambda _: None)
    assert result.on_disk and result.experts["experts_per_layer"] == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_experts == N_EXPERTS - 2


def test_cli_no_load_drop_experts(tmp_path):
    saved("granitemoe", tmp_path / "src")
    result = CliRunner().invoke(app, ["prune", str(tmp_path / "src"), "--out", str(tmp_path / "out"), "--no-load",
                                      "--drop-experts", "0:0,1;1:6,7"])
    assert result.exit_code == 0, result.output
    assert "layer 1: 6,7" in result.output
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_local_experts == N_EXPERTS - 2
