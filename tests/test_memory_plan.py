"""The memory plan from configs alone (meta device) at the papers' scale, against hand computations."""

import json
from dataclasses import replace

import pytest
from transformers import LlamaConfig, MixtralConfig, Qwen2Config
from typer.testing import CliRunner

from cli_asserts import assert_one_line_error
from layerprune.cli import app
from layerprune.planning.memory import inference_activations, plan_memory
from layerprune.finetune.memory import (
    ADAM_BYTES,
    choose_heal,
    gpus_for_full_heal,
    heal_memory,
    NORMAL_EQUATIONS_BLOCK,
    replace_streaming_bytes,
    training_activations,
)
from layerprune.finetune.normal_equations import BLOCK
from layerprune.finetune.config import HealConfig
from layerprune.planning.job import plan_job
from layerprune.models.shape import Job, shape_from_config
from layerprune.hardware.devices import GiB, USABLE, Devices, parse_memory, runtime_bytes

runner = CliRunner()
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False)
LLAMA_70B = dict(LLAMA_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64)
QWEN_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False)
MIXTRAL = dict(LLAMA_8B, vocab_size=32000, num_local_experts=8, num_experts_per_tok=2)


@pytest.fixture(scope="module")
def llama8b():
    return shape_from_config(LlamaConfig(**LLAMA_8B), "llama-3.1-8b")


def test_parameter_counts_equal_a_hand_count(llama8b):
    h, i, kv, v = 4096, 14336, 8 * 128, 128256
    layer = h * (h + kv + kv + h) + 3 * h * i + 2 * h  # q, k, v, o + gate, up, down + two norms
    assert llama8b.per_layer == (layer,) * 32
    assert (llama8b.embedding, llama8b.head, llama8b.other) == (v * h, v * h, h)
    assert llama8b.params() == 32 * layer + 2 * v * h + h == 8_030_261_248  # Llama-3.1-8B
    assert llama8b.params(24) == 24 * layer + 2 * v * h + h
    assert shape_from_config(Qwen2Config(**QWEN_7B)).params() == 7_615_616_512  # Qwen2.5-7B
    assert shape_from_config(MixtralConfig(**MIXTRAL)).params() == 46_702_792_704  # Mixtral-8x7B: every expert
    assert shape_from_config(LlamaConfig(**LLAMA_70B)).params() == 70_553_706_496  # Llama-3.1-70B


def test_full_weight_states_are_sixteen_bytes_per_parameter(llama8b):
    job = Job(layers_kept=24)
    one_gpu = Devices("cuda", 1, 80 * GiB)
    params = llama8b.params(24)
    bf16_copies = 2 * params  # autocast's 16-bit copies of the fp32 weights
    plan = heal_memory("full", llama8b, job, one_gpu)
    assert plan.bytes_per_device - training_activations(llama8b, job, 24, 2) - bf16_copies == ADAM_BYTES * params
    eight = heal_memory("full", llama8b, job, Devices("cuda", 8, 80 * GiB))  # FSDP shards the states
    assert eight.bytes_per_device - training_activations(llama8b, job, 24, 2) - bf16_copies // 8 == \
        ADAM_BYTES * params // 8


def test_an_8b_on_one_80gb_gpu_takes_lora_on_eight_full_weights_and_on_a_24gb_cpu_lora_or_layer_local(llama8b):
    job = Job(layers_kept=24)
    one = choose_heal(llama8b, job, Devices("cuda", 1, 80 * GiB))
    assert one.settings["option"] == "lora" and one.fits
    refused = choose_heal(llama8b, job, Devices("cuda", 1, 80 * GiB), wanted="full")
    assert not refused.fits and refused.bytes_per_device > USABLE * 80 * GiB  # ~96 GiB of states alone
    eight = choose_heal(llama8b, job, Devices("cuda", 8, 80 * GiB))
    assert eight.settings == {"adapter": "none", "fsdp": True, "option": "full"} and eight.fits
    cpu = choose_heal(llama8b, job, Devices("cpu", 1, 24 * GiB))  # native bf16: the base loaded in bf16 directly
    assert cpu.settings["option"] == "lora" and cpu.fits
    emulated = choose_heal(llama8b, job, Devices("cpu", 1, 24 * GiB, bf16=False))  # an fp32 base does not fit
    assert emulated.settings["option"] == "layer-local" and emulated.fits
    assert gpus_for_full_heal(llama8b, job, 80 * GiB) == 2


def test_a_70b_on_one_gpu_needs_qlora_with_checkpointing_and_nothing_fits_a_small_cpu():
    shape = shape_from_config(LlamaConfig(**LLAMA_70B))
    job = Job(layers_kept=60, gradient_checkpointing=True)
    assert choose_heal(shape, job, Devices("cuda", 1, 80 * GiB)).settings["option"] == "qlora"
    nothing = choose_heal(shape, job, Devices("cpu", 1, 8 * GiB))
    assert nothing.settings["option"] == "layer-local" and not nothing.fits


def test_a_70b_heals_layer_by_layer_within_24gb_and_every_streaming_stage_fits():
    """Llama-3-70B with 16 layers removed on a 24 GB CPU: the replace heal's least-squares system is hidden x
    hidden (it maps the MLP's output), solved in place; the embeddings' pass (1.05B params in fp32 beside their
    bf16 copy) is the peak, above each step of the layer before a cut (its weights in fp32 with their bf16
    copy, the system, the folded output projection). The teacher is streamed inside the heal, so there
    is no separate teacher pass, whatever method was asked."""
    shape = shape_from_config(LlamaConfig(**LLAMA_70B))
    cpu = Devices("cpu", 1, 24 * GiB)
    job = Job(layers_kept=64)
    h, i = 8192, 28672
    system = 2 * h * h * 8 + h * h * 4 + 3 * h * 1024 * 8
    layer = max(shape.per_layer)
    steps = [layer * 6, layer * 4 + max(system, 8 * 256 * (8 * h + 2 * i) * 4), layer * 4 + 2 * h * i * 4]
    assert max(steps) < shape.embedding * 6  # the embeddings' pass is the peak at 70B (as measured)
    heal = replace_streaming_bytes(shape, job, cpu)
    assert heal == runtime_bytes(cpu) + shape.embedding * 6 + 64 * 256 * h * 4 * 3 < 8 * GiB
    for teacher in ("alone", "beside", None):
        stages = {s.stage: s for s in plan_memory(shape, job, cpu, teacher=teacher)}
        assert "teacher pass" not in stages
        assert stages["heal"].settings["option"] == "layer-local" and stages["heal"].fits
        for name in ("score (streaming)", "prune (on disk)", "heal", "eval (streaming)"):
            assert stages[name].fits and stages[name].bytes_per_device < 12 * GiB, name
    assert not {s.stage: s for s in plan_memory(shape, job, cpu)}["eval"].fits  # in memory: 100+ GiB


def test_an_8b_with_8_layers_removed_heals_with_lora_over_a_16bit_base_on_one_24gb_gpu(llama8b):
    """The frozen base at 2 bytes per weight where the device computes bf16 natively (as LoRA now holds it),
    adapters and AdamW states fp32; fp32 (and autocast's copies) where bf16 is emulated."""
    job = Job(layers_kept=24)
    kept = llama8b.params(24)
    plan = choose_heal(llama8b, job, Devices("cuda", 1, 24 * GiB))
    assert plan.settings["option"] == "lora" and plan.fits
    assert "(2 B per weight)" in plan.detail and plan.detail.startswith(f"frozen weights {kept * 2 / GiB:.1f} GiB")
    on_80 = heal_memory("lora", llama8b, job, Devices("cuda", 1, 80 * GiB))
    assert on_80.bytes_per_device < 24 * GiB  # 43.6 GiB with the base in fp32
    emulated = heal_memory("lora", llama8b, job, Devices("cpu", 1, 64 * GiB, bf16=False))
    assert "(4 B per weight)" in emulated.detail
    native_cpu = heal_memory("lora", llama8b, job, Devices("cpu", 1, 64 * GiB))
    assert "(2 B per weight)" in native_cpu.detail
    assert native_cpu.bytes_per_device < kept * 4  # loaded in 16 bits directly: never whole in fp32
    fp32_checkpoint = heal_memory("lora", replace(llama8b, stored_bytes=4.0), job, Devices("cuda", 1, 80 * GiB))
    assert "(4 B per weight)" in fp32_checkpoint.detail


def test_the_plan_says_which_healing_each_common_card_takes(llama8b):
    plan = plan_job(llama8b, 24, Devices("cuda", 1, 24 * GiB))
    assert list(plan.heal_per_card) == ["24 GB", "48 GB", "80 GB"]
    assert {card["option"] for card in plan.heal_per_card.values()} == {"lora"}
    assert all(card["fits"] and card["peak_gib"] < 21.6 for card in plan.heal_per_card.values())
    assert plan.to_json()["heal_per_card"]["24 GB"]["option"] == "lora"


def test_an_8b_minus_8_layers_heals_by_default_teacher_pass_included_on_one_24gb_gpu(llama8b, tmp_path):
    """The default heal (distillation) of Llama-3.1-8B minus 8 layers on one 24 GB GPU: its teacher pass holds the
    teacher alone in bf16 (16.5 GiB; both models in fp32 were 54.9 GiB), then LoRA over a bf16 base (20.2 GiB)."""
    plan = plan_job(llama8b, 24, Devices("cuda", 1, 24 * GiB))
    rows = {row["stage"]: row for row in plan.stages}
    assert rows["teacher pass"]["fits"] and rows["teacher pass"]["peak_gib"] < 0.9 * 24 < 54.9
    assert plan.heal["option"] == "lora" and plan.heal["fits"]
    assert plan.heal["teacher_pass"] == {"peak_gib": rows["teacher pass"]["peak_gib"], "fits": True}
    assert plan.heal_per_card["24 GB"] == {"option": "lora", "fits": True, "peak_gib": rows["heal"]["peak_gib"],
                                           "teacher": "on the GPU"}
    LlamaConfig(**LLAMA_8B).save_pretrained(tmp_path / "llama-8b")  # the config alone: no weights
    result = runner.invoke(app, ["plan", str(tmp_path / "llama-8b"), "--num-layers", "8", "--gpus", "1",
                                 "--gpu-memory", "24GB"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "healing: lora, after its teacher pass (16.5 GiB): both fit" in result.output
    budget = plan_job(llama8b, 24, Devices("cuda", 1, 24 * GiB), HealConfig(max_minutes=30))
    assert budget.heal["teacher_pass"]["fits"]  # both do not fit 24 GB: the teacher still goes first, alone
    seventy = shape_from_config(LlamaConfig(**LLAMA_70B))  # 131 GiB of teacher: read from disk, on the CPU
    assert plan_job(seventy, 60, Devices("cuda", 1, 80 * GiB)).heal_per_card["80 GB"] == {
        "option": "qlora", "fits": True, "peak_gib": pytest.approx(71.1, abs=0.1), "teacher": "from disk"}


def test_the_plan_counts_the_solver_block_of_the_normal_equations():
    assert NORMAL_EQUATIONS_BLOCK == BLOCK


def test_the_teacher_pass_holds_the_teacher_alone_in_16_bits_and_eval_the_pruned_model(llama8b):
    job = Job(layers_kept=24)
    gpu = Devices("cuda", 1, 80 * GiB)
    stages = {s.stage: s for s in plan_memory(llama8b, job, gpu)}
    teacher = llama8b.params() * 2  # the teacher alone, loaded in bf16 directly; the student loads once it is freed
    assert stages["teacher pass"].bytes_per_device - teacher == inference_activations(llama8b, job, 2)
    assert "(2 B per weight) alone" in stages["teacher pass"].detail
    beside = {s.stage: s for s in plan_memory(llama8b, job, gpu, teacher="beside")}["teacher pass"]
    assert beside.bytes_per_device - teacher - llama8b.params(24) * 4 == inference_activations(llama8b, job, 2)
    emulated = Devices("cpu", 1, 256 * GiB, bf16=False)  # bf16 emulated: the teacher in fp32, as it computes
    alone = {s.stage: s for s in plan_memory(llama8b, job, emulated)}["teacher pass"]
    assert alone.bytes_per_device - runtime_bytes(emulated) - llama8b.params() * 4 == \
        inference_activations(llama8b, job, 4)
    fp32_checkpoint = replace(llama8b, stored_bytes=4.0)  # never rounded to 16 bits
    assert "(4 B per weight)" in {s.stage: s for s in plan_memory(fp32_checkpoint, job, gpu)}["teacher pass"].detail
    assert stages["score"].bytes_per_device == llama8b.params() * 2 + inference_activations(llama8b, job, 2, False)
    assert stages["eval"].bytes_per_device < stages["teacher pass"].bytes_per_device  # 24 layers, not 32
    assert stages["prune (on disk)"].bytes_per_device == 0  # the kernel copies file to file; no host RAM on a GPU


def test_memory_sizes_parse_and_refuse_nonsense():
    assert parse_memory("80GB") == parse_memory("80 GiB") == 80 * GiB
    assert parse_memory("512MB") == 512 * 2**20
    with pytest.raises(Exception, match="cannot read the memory size"):
        parse_memory("lots")


def test_cli_plan_prints_json_for_a_local_folder(tiny_dir):
    result = runner.invoke(app, ["plan", str(tiny_dir), "--num-layers", "2", "--gpus", "2", "--gpu-memory", "1GB",
                                 "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert (plan["layers"], plan["layers_kept"], plan["devices"]) == (5, 3, "2 x GPU 1 GiB")
    assert [s["stage"] for s in plan["stages"]] == ["score", "score (streaming)", "prune (on disk)", "teacher pass",
                                                    "heal", "heal (streaming)", "eval", "eval (streaming)"]
    assert plan["heal"]["option"] == "full" and plan["heal"]["fsdp"] is True


def test_cli_plan_errors_in_one_line(tiny_dir):
    assert_one_line_error(runner.invoke(app, ["plan", str(tiny_dir), "--gpus", "0"]), "--gpus must be at least 1")
    assert_one_line_error(runner.invoke(app, ["plan", "nobody/not-cached-model"]), "not in the local cache")


def adapter_needs(config, model_config, devices):
    shape = shape_from_config(model_config)
    job = Job(layers_kept=shape.layers, batch=config.batch_size, seq_len=config.max_length,
              loss_chunk=config.loss_chunk, lora_r=config.lora_r)
    return {o: heal_memory(o, shape, job, devices).bytes_per_device for o in ("full", "lora")}


def test_adapter_auto_takes_full_weights_where_they_fit_else_lora_else_refuses():
    from layerprune.errors import LayerpruneError
    from layerprune.finetune.config import HealConfig
    from layerprune.finetune.fit import fit_heal
    config = HealConfig(batch_size=1, max_length=64)
    model_config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                               num_key_value_heads=8, vocab_size=32000)  # states outweigh activations here
    assert config.adapter == "auto"
    needs = adapter_needs(config, model_config, Devices("cpu", 1, GiB))
    assert needs["lora"] < needs["full"]
    said = []
    roomy = fit_heal(config, model_config, devices=Devices("cpu", 1, 64 * GiB), log=said.append)
    assert roomy.adapter == "none" and not said
    between = int((needs["lora"] + needs["full"]) / 2 / USABLE)
    tight = fit_heal(config, model_config, devices=Devices("cpu", 1, between), log=said.append)
    assert tight.adapter == "lora" and "healing a LoRA adapter" in said[0]
    with pytest.raises(LayerpruneError, match="does not fit .* Options: --method qlora"):
        fit_heal(config, model_config, devices=Devices("cpu", 1, int(needs["lora"] / 2)))
    assert fit_heal(HealConfig(method="partial"), model_config, devices=Devices("cpu", 1, 1)).adapter == "none"
    assert fit_heal(HealConfig(adapter="none"), model_config, devices=Devices("cpu", 1, 1)).adapter == "none"


@pytest.mark.integration
def test_finetune_heals_with_lora_when_full_weights_do_not_fit_and_refuses_before_loading(tmp_path, monkeypatch,
                                                                                           corpus_file):
    import layerprune.api as api
    import layerprune.finetune.fit as fit
    from layerprune import save_model
    from layerprune.errors import LayerpruneError
    from layerprune.finetune.config import HealConfig
    from tiny_models import tiny_model, tiny_tokenizer

    save_model(tiny_model("llama"), tiny_tokenizer(), tmp_path / "model")
    settings = dict(method="cpt", data=str(corpus_file), max_steps=2, max_length=32, batch_size=2, warmup_steps=0)
    model_config = tiny_model("llama").config
    needs = adapter_needs(HealConfig(**settings), model_config, Devices("cpu", 1, GiB))
    assert needs["lora"] < needs["full"]
    between = int((needs["lora"] + needs["full"]) / 2 / USABLE)
    monkeypatch.setattr(fit, "this_machine", lambda: Devices("cpu", 1, between))
    import layerprune.finetune.stage as heal_stage

    monkeypatch.setattr(heal_stage, "parameter_bytes", lambda model: 0)  # the plan's memory as given
    api.finetune_model(str(tmp_path / "model"), out=str(tmp_path / "healed"), **settings)
    record = json.loads((tmp_path / "healed" / "heal.json").read_text())
    assert record["config"]["adapter"] == "lora"

    monkeypatch.setattr(fit, "this_machine", lambda: Devices("cpu", 1, int(needs["lora"] / 2)))
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded before the plan refused"))
    with pytest.raises(LayerpruneError, match="does not fit"):
        api.finetune_model(str(tmp_path / "model"), out=str(tmp_path / "refused"), **settings)
    assert not (tmp_path / "refused").exists()


def test_jobs_on_models_over_1b_parameters_print_the_plan_first(tmp_path, tiny_dir, monkeypatch):
    from layerprune.selection.config import PruneConfig
    from layerprune.planning.job import announce_plan

    # a machine where full weights fit: the default heal (distill) with its teacher pass, whatever runs the test
    monkeypatch.setattr("layerprune.planning.job.this_machine", lambda: Devices("cpu", 1, 256 * GiB))
    LlamaConfig(**LLAMA_8B).save_pretrained(tmp_path / "llama-8b")  # the config alone: no weights
    lines = []
    announce_plan(str(tmp_path / "llama-8b"), prune=PruneConfig(num_layers=8), log=lines.append)
    assert lines[0].startswith("memory plan (8.0B -> 6.3B params on ")
    assert any(line.startswith("  teacher pass: ") for line in lines) and lines[-1].startswith("  healing: ")
    experts_of_a_dense_model = []  # no plan: the prune's own check refuses it in its words
    announce_plan(str(tmp_path / "llama-8b"), prune=PruneConfig(expert_ratio=0.25), log=experts_of_a_dense_model.append)
    assert experts_of_a_dense_model == []
    quiet = []
    announce_plan(str(tiny_dir), log=quiet.append)
    assert quiet == []


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_plan_of_a_gguf_reads_its_metadata_only_and_plans_as_its_conversion(tmp_path, monkeypatch, arch):
    import gguf

    from gguf_files import write_gguf
    from layerprune.models import loading
    from layerprune.models.loading import model_folder

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "model.gguf", arch)
    args = ["--num-layers", "2", "--gpus", "1", "--gpu-memory", "1GB", "--json"]

    def refuse(*args, **kwargs):
        raise AssertionError("plan dequantized or converted the GGUF")

    class Untouchable:  # a tensor's data, which plan must never look at
        def __getattr__(self, name):
            raise AssertionError(f"plan read tensor data ({name})")

        def __array__(self, *args, **kwargs):
            raise AssertionError("plan read tensor data")

    build = gguf.GGUFReader._build_tensors

    def build_untouchable(self, start, fields):
        build(self, start, fields)
        self.tensors = [t._replace(data=Untouchable()) for t in self.tensors]

    with monkeypatch.context() as patched:  # no dequantization, no conversion, no tensor data
        for module, name in ((gguf, "dequantize"), (gguf.quants, "dequantize"), (loading, "_convert_gguf")):
            patched.setattr(module, name, refuse)
        patched.setattr(gguf.GGUFReader, "_build_tensors", build_untouchable)
        result = runner.invoke(app, ["plan", str(path), *args])
    assert result.exit_code == 0, result.output
    from_metadata = json.loads(result.output)
    assert not (tmp_path / "cache" / "models").exists()  # nothing was converted

    folder = model_folder(str(path))  # the conversion every command that loads the model goes through
    converted = json.loads(runner.invoke(app, ["plan", folder, *args]).output)
    assert from_metadata.pop("model") == str(path) and converted.pop("model") == folder
    # the same plan: every name, count and choice; sizes and times within 1% (the converted folder's weights file
    # holds its safetensors header too, and its size is what a folder's plan reads)
    # what the outputs will hold: the folder's plan reads its weights file's size, safetensors header included
    for plan in (from_metadata, converted):
        plan.pop("disk")
    assert from_metadata.pop("disk_bytes") == pytest.approx(converted.pop("disk_bytes"), rel=0.01)
    assert same_within(from_metadata, converted, 0.01), (from_metadata, converted)
    assert from_metadata["layers"] == converted["layers"] and from_metadata["params"] == converted["params"]


def same_within(a, b, rel: float) -> bool:
    """Equal JSON values, numbers other than counts within `rel`."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_within(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(same_within(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float) or (isinstance(a, int) and a > 10**6 and not isinstance(a, bool)):
        return b == pytest.approx(a, rel=rel, abs=1e-9)
    return a == b
