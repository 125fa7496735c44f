"""`layerprune plan`'s disk: what each writing stage writes, counted from the shape, against the free space of
the disk it goes to (the free-space function is patched: no test depends on this machine's disk)."""

import json

import pytest
from transformers import LlamaConfig
from typer.testing import CliRunner

import layerprune.planning.disk as disk
from cli_asserts import assert_one_line_error
from layerprune.cli import app
from layerprune.finetune.config import HealConfig
from layerprune.hardware.devices import GiB, Devices
from layerprune.models.shape import shape_from_config
from layerprune.planning.job import plan_job

runner = CliRunner()
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
LLAMA_70B = dict(LLAMA_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)


@pytest.fixture
def free(monkeypatch, tmp_path):
    """free(bytes): the free space every disk reports; the cache on the output's disk (tmp_path)."""
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))

    def set_free(value):
        monkeypatch.setattr(disk, "free_bytes", lambda path: value)
    return set_free


def rows(plan) -> dict:
    return {row["what"]: row["bytes"] for row in plan.disk["rows"]}


def test_a_70b_plan_on_a_24gb_cpu_writes_two_checkpoints_of_the_stored_dtype(free, tmp_path):
    """Llama-3-70B minus 25% heals layer by layer on a 24 GB CPU: the pruned and the healed checkpoint, each
    53.4B params in bf16 (the healed one rewrites only the tensors it changed), ~199 GiB in all."""
    shape = shape_from_config(LlamaConfig(**LLAMA_70B))
    kept = shape.params(60)
    free(150 * GiB)
    plan = plan_job(shape, 60, Devices("cpu", 1, 24 * GiB), out=str(tmp_path))
    assert plan.heal["option"] == "layer-local"
    assert rows(plan) == {"pruned checkpoint": kept * 2, "healed checkpoint (layer-local)": kept * 2}
    assert plan.disk_bytes == 4 * kept and 198 * GiB < plan.disk_bytes < 200 * GiB
    assert plan.disk["disks"] == [{"where": str(tmp_path), "needs": 4 * kept, "free": 150 * GiB, "fits": False}]
    assert not plan.disk["fits"]
    free(250 * GiB)
    assert plan_job(shape, 60, Devices("cpu", 1, 24 * GiB), out=str(tmp_path)).disk["fits"]


def test_the_healed_checkpoint_is_written_in_the_dtype_its_weights_end_in_and_the_caches_count(free, tmp_path):
    shape = shape_from_config(LlamaConfig(**LLAMA_8B))
    kept = shape.params(24)
    free(None)  # unknown free space: taken as fitting
    lora = plan_job(shape, 24, Devices("cuda", 1, 24 * GiB), out=str(tmp_path))  # merged into the bf16 base
    positions = 150 * 4 * 256  # the default heal's rows x tokens: top-64 values and ids + bf16 states at a cut
    assert rows(lora) == {"pruned checkpoint": kept * 2, "healed checkpoint (lora)": kept * 2,
                          "teacher targets (cache)": positions * 64 * 8 + positions * 4096 * 2}
    assert lora.disk["fits"] and lora.disk["disks"][0]["free"] is None
    full = plan_job(shape, 24, Devices("cuda", 8, 80 * GiB), HealConfig(distill_hidden=0, save_steps=50),
                    out=str(tmp_path))  # every weight trained: saved from the fp32 master weights
    assert rows(full) == {"pruned checkpoint": kept * 2, "healed checkpoint (full)": kept * 4,
                          "teacher targets (cache)": positions * 64 * 8,
                          "3 Trainer checkpoints (work folder)": 3 * kept * 12}
    layer_local = plan_job(shape, 24, Devices("cpu", 1, 8 * GiB), HealConfig(method="replace"), out=str(tmp_path))
    assert list(rows(layer_local)) == ["pruned checkpoint", "healed checkpoint (layer-local)"]  # nothing cached


def test_a_gguf_export_counts_its_file_and_the_f16_copy_a_quantizer_reads(free, tmp_path):
    shape = shape_from_config(LlamaConfig(**LLAMA_8B))
    kept = shape.params(24)
    free(10**15)
    q4 = rows(plan_job(shape, 24, Devices("cuda", 1, 80 * GiB), gguf="q4_k_m", out=str(tmp_path)))
    assert q4["GGUF file (q4_k_m)"] == round(kept * 4.89 / 8) and q4["its f16 copy while quantizing"] == kept * 2
    f16 = rows(plan_job(shape, 24, Devices("cuda", 1, 80 * GiB), gguf="f16", out=str(tmp_path)))
    assert f16["GGUF file (f16)"] == kept * 2 and "its f16 copy while quantizing" not in f16  # the converter's own


def test_every_gguf_quantization_export_writes_has_its_bits_per_weight():
    from layerprune.export.gguf import CONVERTER_QUANTS, QUANTS

    assert set(disk.GGUF_BITS) == set(QUANTS) and set(disk.GGUF_STAGED) == set(CONVERTER_QUANTS)


def test_outputs_and_caches_on_two_disks_are_checked_each_against_its_own_free_space(free, monkeypatch, tmp_path):
    shape = shape_from_config(LlamaConfig(**LLAMA_8B))
    kept = shape.params(24)
    free(12 * GiB)
    monkeypatch.setattr(disk, "_device_of", lambda path: "cache-disk" if path.name == "cache" else "out-disk")
    plan = plan_job(shape, 24, Devices("cuda", 1, 24 * GiB), out=str(tmp_path / "out"))
    outputs, cache = plan.disk["disks"]
    assert (outputs["needs"], outputs["fits"]) == (4 * kept, False)  # two 11.7 GiB checkpoints > 12 GiB
    assert cache["where"] == str(tmp_path) and cache["fits"] and cache["needs"] == rows(plan)["teacher targets (cache)"]


def test_cli_plan_says_whether_the_outputs_fit_the_disk_and_refuses_an_unknown_quantization(free, tmp_path):
    LlamaConfig(**LLAMA_8B).save_pretrained(tmp_path / "llama-8b")  # the config alone: no weights
    free(20 * GiB)
    args = ["plan", str(tmp_path / "llama-8b"), "--num-layers", "8", "--gpus", "1", "--gpu-memory", "24GB",
            "--out", str(tmp_path / "runs" / "new")]  # a folder not made yet: its nearest existing parent's disk
    result = runner.invoke(app, [*args, "--gguf", "q8_0"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # as wrapped at any width
    plan = json.loads(runner.invoke(app, [*args, "--gguf", "q8_0", "--json"]).output)
    assert plan["disk"]["fits"] is False and plan["disk_bytes"] == sum(r["bytes"] for r in plan["disk"]["rows"])
    assert "GGUF file (q8_0): 6.2 GiB" in said
    assert f"{plan['disk_bytes'] / GiB:.1f} GiB at {tmp_path} (20.0 GiB free): does not fit" in said
    assert_one_line_error(runner.invoke(app, [*args, "--gguf", "q9_x"]), "unknown --gguf quantization 'q9_x'")
