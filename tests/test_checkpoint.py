"""Pruning a safetensors checkpoint on disk gives the same folder as load + remove_layers + save."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging
from typer.testing import CliRunner

from layerprune import LayerpruneError, load_model, remove_layers, save_model
from layerprune.cli import app
from layerprune.models import checkpoint, memory_policy
from layerprune.models.checkpoint import (
    INDEX_NAME,
    OutputTensor,
    TensorEntry,
    find_layers_prefix,
    plan_renames,
    plan_shards,
    prune_checkpoint,
    read_checkpoint,
)
from tiny_models import FAMILIES, N_LAYERS, tiny_input, tiny_model, tiny_tokenizer

hf_logging.disable_progress_bar()
DROP = [1, 3]
KEPT = [i for i in range(N_LAYERS) if i not in DROP]


def sharded(folder: Path, family: str = "llama", **overrides) -> Path:
    """A tiny checkpoint in ~20 KB shards: several files, and layers cut across files."""
    tiny_model(family, **overrides).save_pretrained(folder, max_shard_size="20KB")
    return folder


def save_unwrapped_gpt2(model, folder: Path) -> None:
    """GPT-2 as hub files store it: `h.0.attn...`, `wte.weight` (no `transformer.`), no tied lm_head."""
    model.config.save_pretrained(folder)
    state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()}
    del state["lm_head.weight"]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        found.update(load_file(path))
    return found


@torch.no_grad()
def logits(model, ids):
    return model(input_ids=ids, use_cache=False).logits


# ---------------------------------------------------------------------------------------------
# The plan: pure functions
# ---------------------------------------------------------------------------------------------


def test_plan_renames_renumbers_kept_layers_and_drops_the_others():
    names = [
        "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight",
        "model.layers.2.self_attn.q_proj.weight", "model.layers.10.input_layernorm.weight", "model.norm.weight",
        "lm_head.weight",
    ]
    plan = plan_renames(names, "model.layers", [0, 2, 10])
    assert plan == {
        "model.embed_tokens.weight": "model.embed_tokens.weight",
        "model.layers.0.mlp.up_proj.weight": "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.mlp.up_proj.weight": None,
        "model.layers.2.self_attn.q_proj.weight": "model.layers.1.self_attn.q_proj.weight",
        "model.layers.10.input_layernorm.weight": "model.layers.2.input_layernorm.weight",
        "model.norm.weight": "model.norm.weight",
        "lm_head.weight": "lm_head.weight",
    }


def test_plan_renames_matches_whole_path_components_only():
    names = ["model.layers_norm.0.weight", "model.layers.1", "xmodel.layers.1.w", "model.layers.x.w", "h.1.attn.w"]
    assert plan_renames(names, "model.layers", [0]) == {n: n for n in names}
    assert plan_renames(["h.1.attn.w", "h.12.attn.w", "wte.weight"], "h", [12, 1]) == {
        "h.1.attn.w": "h.1.attn.w", "h.12.attn.w": "h.0.attn.w", "wte.weight": "wte.weight",
    }
    with pytest.raises(ValueError, match="duplicates"):
        plan_renames(names, "model.layers", [0, 0])


def test_layers_prefix_is_found_with_or_without_the_wrapper():
    full = ["transformer.h.0.ln_1.weight", "transformer.wte.weight"]
    assert find_layers_prefix(full, "transformer.h") == "transformer.h"
    assert find_layers_prefix(["h.0.ln_1.weight", "wte.weight"], "transformer.h") == "h"
    assert find_layers_prefix(["layers.3.mlp.w", "embed_tokens.weight"], "model.layers") == "layers"
    with pytest.raises(LayerpruneError, match="no decoder layer tensor"):
        find_layers_prefix(["encoder.block.0.w"], "model.layers")
    with pytest.raises(LayerpruneError, match="more than one way"):
        find_layers_prefix(["model.layers.0.w", "layers.1.w"], "model.layers")


def test_plan_shards_is_greedy_and_gives_a_big_tensor_its_own_shard():
    def t(name, nbytes):
        return OutputTensor(name, TensorEntry(name, "f", "F32", (nbytes // 4,), 0, nbytes))

    shards = plan_shards([t("a", 40), t("b", 40), t("c", 30), t("big", 500), t("d", 10)], max_shard_size=100)
    assert [[x.name for x in shard] for shard in shards] == [["a", "b"], ["c"], ["big"], ["d"]]
    assert plan_shards([], 100) == [[]]


# ---------------------------------------------------------------------------------------------
# Against in-memory surgery, for every family
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_prune_equals_in_memory_surgery(family, tmp_path):
    src = sharded(tmp_path / "src", family)
    files = sorted(p.name for p in src.glob("*.safetensors"))
    layer_files = {
        f for f in files
        for name in safe_open(src / f, "pt").keys()
        if name.startswith(("model.layers.2.", "transformer.h.2.", "gpt_neox.layers.2.", "model.decoder.layers.2."))
    }
    assert len(files) > 2 and len(layer_files) > 1, "the fixture must cut a layer across shards"

    result = prune_checkpoint(src, DROP, tmp_path / "disk")
    loaded = load_model(src)
    remove_layers(loaded.model, DROP, how={"chosen_by": "explicit"})
    save_model(loaded.model, None, tmp_path / "memory")

    on_disk, in_memory = tensors(tmp_path / "disk"), tensors(tmp_path / "memory")
    assert on_disk.keys() == in_memory.keys()
    for name in on_disk:
        assert on_disk[name].dtype == in_memory[name].dtype and torch.equal(on_disk[name], in_memory[name]), name
    config = json.loads((tmp_path / "disk" / "config.json").read_text())
    assert config == json.loads((tmp_path / "memory" / "config.json").read_text())
    for key, value in config.items():
        if isinstance(value, list) and key not in ("architectures", "mlp_only_layers"):
            assert len(value) != N_LAYERS, f"per-layer list {key} still has an entry for removed layers"
    record = json.loads((tmp_path / "disk" / "layerprune.json").read_text())
    memory_record = json.loads((tmp_path / "memory" / "layerprune.json").read_text())
    for key in ("source", "original_num_layers", "kept_layers", "dropped_layers", "history"):
        assert record[key] == memory_record[key], key

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "disk").eval()
    assert type(reloaded) is type(loaded.model)
    ids = tiny_input()
    torch.testing.assert_close(logits(reloaded, ids), logits(loaded.model, ids), rtol=1e-5, atol=1e-5)
    assert (result.layers_before, result.layers_after, result.dropped) == (N_LAYERS, N_LAYERS - 2, DROP)
    assert result.params_after == sum(t.numel() for t in on_disk.values())


def test_sharded_output_has_a_correct_index(tmp_path):
    src = sharded(tmp_path / "src")
    result = prune_checkpoint(src, DROP, tmp_path / "out", max_shard_size="30KB")
    out = tmp_path / "out"
    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(p.name for p in out.glob("*.safetensors"))
    assert result.shards == len(files) > 1 and set(index["weight_map"].values()) == set(files)
    stored = {}
    for f in files:
        with safe_open(out / f, "pt") as h:
            assert h.metadata() == {"format": "pt"}
            stored.update({name: f for name in h.keys()})
            assert all(h.get_tensor(n).nbytes <= 30_000 for n in h.keys())
    assert index["weight_map"] == stored
    total = sum(t.numel() * t.element_size() for t in tensors(out).values())
    assert index["metadata"]["total_size"] == total == result.bytes_after
    assert not any(name.startswith(f"model.layers.{N_LAYERS - 2}.") for name in stored)


def test_small_output_is_one_file_without_index(tmp_path):
    src = sharded(tmp_path / "src")
    prune_checkpoint(src, DROP, tmp_path / "out", max_shard_size="10MB")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "out" / INDEX_NAME).exists()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_hidden_layers == N_LAYERS - 2


def test_copy_without_kernel_support_gives_the_same_files(tmp_path, monkeypatch):
    src = sharded(tmp_path / "src")
    prune_checkpoint(src, DROP, tmp_path / "kernel")
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    monkeypatch.setattr(checkpoint, "_COPY_CHUNK", 1000)  # many small reads through the buffer
    prune_checkpoint(src, DROP, tmp_path / "buffered")
    files = sorted(p.name for p in (tmp_path / "kernel").glob("*.safetensors"))
    assert files == sorted(p.name for p in (tmp_path / "buffered").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "kernel" / name).read_bytes() == (tmp_path / "buffered" / name).read_bytes()


def test_second_prune_composes_original_indices(tmp_path):
    src = sharded(tmp_path / "src")
    prune_checkpoint(src, [1], tmp_path / "once")
    prune_checkpoint(tmp_path / "once", [3], tmp_path / "twice")
    prune_checkpoint(src, [1, 3], tmp_path / "direct")
    config = AutoConfig.from_pretrained(tmp_path / "twice")
    assert config.layerprune["kept_layers"] == [0, 2, 4]
    assert config.layerprune["dropped_layers"] == [1, 3]
    assert [step["dropped"] for step in config.layerprune["history"]] == [[1], [3]]
    assert config.layerprune["source"] == str(src)
    twice, direct = tensors(tmp_path / "twice"), tensors(tmp_path / "direct")
    assert twice.keys() == direct.keys() and all(torch.equal(twice[k], direct[k]) for k in twice)
    with pytest.raises(LayerpruneError, match="already removed"):
        prune_checkpoint(tmp_path / "twice", [1], tmp_path / "thrice")


def test_tied_embeddings_stay_tied_without_an_lm_head_tensor(tmp_path):
    src = sharded(tmp_path / "src", "llama", tie_word_embeddings=True)
    assert "lm_head.weight" not in {e.name for e in read_checkpoint(src)}
    prune_checkpoint(src, DROP, tmp_path / "out")
    assert "lm_head.weight" not in tensors(tmp_path / "out")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


def test_gpt2_checkpoint_without_the_transformer_prefix(tmp_path):
    """Hub GPT-2 files name tensors `h.0.attn...`, `wte.weight`: they are pruned under that spelling."""
    model = tiny_model("gpt2")
    src = tmp_path / "src"
    save_unwrapped_gpt2(model, src)
    prune_checkpoint(src, DROP, tmp_path / "out")
    names = set(tensors(tmp_path / "out"))
    assert "h.2.attn.c_attn.weight" in names and "wte.weight" in names and not any(n.startswith("h.3.") for n in names)
    reference = tiny_model("gpt2")
    remove_layers(reference, DROP)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = tiny_input()
    torch.testing.assert_close(logits(reloaded, ids), logits(reference.eval(), ids), rtol=1e-5, atol=1e-5)


def test_tokenizer_generation_and_chat_template_files_are_copied(tmp_path):
    src = sharded(tmp_path / "src")
    tiny_tokenizer().save_pretrained(src)
    (src / "README.md").write_text("card of the original model\n")
    prune_checkpoint(src, DROP, tmp_path / "out")
    out = tmp_path / "out"
    for path in src.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens", "chat_template", "generation_config")):
            assert (out / path.name).read_bytes() == path.read_bytes(), path.name
    assert not (out / "README.md").exists()
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == tiny_tokenizer().chat_template


# ---------------------------------------------------------------------------------------------
# Refusals: one clear error, nothing written
# ---------------------------------------------------------------------------------------------


def assert_nothing_written(parent: Path, out: Path) -> None:
    assert not out.exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{out.name}.")], "temporary folder left behind"


def test_pickle_checkpoints_are_refused(tmp_path):
    model = tiny_model("llama")
    src = tmp_path / "src"
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(LayerpruneError, match="convert to safetensors first"):
        prune_checkpoint(src, DROP, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_unknown_model_type_is_refused(tmp_path):
    src = tmp_path / "src"
    config = AutoConfig.for_model("falcon", vocab_size=128, hidden_size=32, num_attention_heads=4, num_hidden_layers=3)
    config.save_pretrained(src)
    save_file({f"transformer.h.{i}.w": torch.zeros(2) for i in range(3)}, src / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(LayerpruneError, match="no layout known for model_type 'falcon'"):
        prune_checkpoint(src, [0], tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


@pytest.mark.parametrize(
    "drop, message",
    [([N_LAYERS], "out of range"), ([1, 1], "duplicate"), (list(range(N_LAYERS)), "cannot drop all")],
)
def test_bad_drop_lists_write_nothing(drop, message, tmp_path):
    src = sharded(tmp_path / "src")
    with pytest.raises(LayerpruneError, match=message):
        prune_checkpoint(src, drop, tmp_path / "out")
    assert_nothing_written(tmp_path, tmp_path / "out")


def test_existing_output_is_refused_without_overwrite(tmp_path):
    src = sharded(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LayerpruneError, match="--overwrite"):
        prune_checkpoint(src, DROP, out)
    with pytest.raises(LayerpruneError, match="not written by layerprune"):  # --overwrite replaces only its own
        prune_checkpoint(src, DROP, out, overwrite=True)
    assert sorted(os.listdir(out)) == ["keep.txt"]
    (out / "keep.txt").unlink()
    prune_checkpoint(src, DROP, out)  # an empty folder is taken
    prune_checkpoint(src, DROP, out, overwrite=True)  # and then replaced, being layerprune's
    assert (out / "config.json").is_file()


def test_layer_tensors_must_match_the_config(tmp_path):
    src = sharded(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = N_LAYERS - 1
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(LayerpruneError, match=r"unexpected layer indices \[4\]"):
        prune_checkpoint(src, [0], tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, fragment):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and fragment in result.stderr, result.stderr


@pytest.mark.integration
def test_cli_no_load_prunes_on_disk(tmp_path):
    src = sharded(tmp_path / "src")
    result = run("prune", src, "--drop", "1,3", "--out", tmp_path / "out", "--no-load")
    assert result.exit_code == 0, result.output
    assert "dropped original layers: 1,3" in result.output
    prune_checkpoint(src, DROP, tmp_path / "api")
    on_disk, direct = tensors(tmp_path / "out"), tensors(tmp_path / "api")
    assert on_disk.keys() == direct.keys() and all(torch.equal(on_disk[k], direct[k]) for k in on_disk)


@pytest.mark.parametrize(
    "extra, fragment",
    [(["--ratio", "0.4"], "need the loaded model"), (["--drop", "1", "--sample", "hi"], "--sample need the loaded")],
)
def test_cli_no_load_refuses_what_needs_the_model(extra, fragment, tmp_path):
    src = sharded(tmp_path / "src")
    one_line_error(run("prune", src, *extra, "--out", tmp_path / "out", "--no-load"), fragment)
    assert not (tmp_path / "out").exists()


@pytest.mark.integration
def test_cli_switches_to_disk_when_the_weights_exceed_memory(tmp_path, monkeypatch):
    src = sharded(tmp_path / "src")
    monkeypatch.setattr(memory_policy, "available_memory_bytes", lambda: 1000)
    result = run("prune", src, "--drop", "1,3", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "pruning the checkpoint on disk" in " ".join(result.output.split())
    assert "pruned_on_disk" in json.loads((tmp_path / "out" / "layerprune.json").read_text())


def test_available_memory_is_read_from_meminfo(tmp_path, monkeypatch):
    import builtins

    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   12345678 kB\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: real_open(meminfo if path == "/proc/meminfo" else path,
                                                                           *a, **k))
    assert memory_policy.available_memory_bytes() == 12345678 * 1024


def test_the_api_prunes_on_disk_when_the_weights_exceed_memory(tmp_path, monkeypatch):
    """The automatic on-disk choice lives in the API: Python users get it as the CLI does, with one result type."""
    from layerprune.api import PruneResult, prune_model

    src = sharded(tmp_path / "src")
    said = []
    monkeypatch.setattr(memory_policy, "available_memory_bytes", lambda: 1000)
    result = prune_model(str(src), out=str(tmp_path / "auto"), drop=DROP, log=said.append)
    assert isinstance(result, PruneResult) and result.on_disk and result.shards >= 1
    assert result.dropped == DROP and result.layers_after == N_LAYERS - len(DROP)
    assert any("pruning the checkpoint on disk" in line for line in said)
    monkeypatch.undo()
    loaded = prune_model(str(src), out=str(tmp_path / "loaded"), drop=DROP, log=said.append)
    assert not loaded.on_disk and loaded.dropped == result.dropped
    on_disk, in_memory = tensors(tmp_path / "auto"), tensors(tmp_path / "loaded")
    assert on_disk.keys() == in_memory.keys() and all(torch.equal(on_disk[k], in_memory[k]) for k in on_disk)
