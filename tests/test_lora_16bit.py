"""LoRA over a 16-bit frozen base: the base stays in the checkpoint's bf16 where the device computes bf16
natively (hardware/compute.py decides), fp32 where bf16 is emulated, and is loaded so directly (never whole in
fp32 first); adapters and optimizer state are fp32."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

import layerprune.api as api
import layerprune.finetune.fit as fit
import layerprune.finetune.placement as placement
from layerprune import remove_layers, save_model
from layerprune.data.instructions import Example, tokenize_examples
from layerprune.finetune import HealConfig, heal
from layerprune.finetune.memory import heal_memory
from layerprune.finetune.methods import HealContext, Lora
from layerprune.hardware import compute
from layerprune.hardware.compute import ComputeChoice, frozen_dtype
from layerprune.hardware.devices import USABLE, Devices, GiB
from layerprune.models.loading import load_model
from layerprune.models.shape import Job, shape_from_config
from tiny_models import CORPUS, tiny_input, tiny_model, tiny_tokenizer

WORDS = ["cat", "dog", "sun", "sky", "red", "big", "owl", "map"]


@pytest.fixture
def bf16_checkpoint(tmp_path):
    """A tiny Llama stored in bf16, loaded for training in fp32 (HealConfig.train_dtype fp32), as the heal does."""
    save_model(tiny_model("llama").to(torch.bfloat16), tiny_tokenizer(), tmp_path / "bf16")
    return load_model(tmp_path / "bf16", dtype="fp32").model


@pytest.fixture
def native(monkeypatch):
    def set_native(value: bool):
        monkeypatch.setattr(compute, "cpu_bf16_support", lambda: (value, "monkeypatched"))
    return set_native


def test_the_frozen_dtype_is_the_stored_half_type_only_where_healing_computes_in_it():
    bf16, fp32 = ComputeChoice("bf16", "cpu", "native"), ComputeChoice("fp32", "cpu", "emulated")
    assert frozen_dtype(bf16, torch.bfloat16) == torch.bfloat16
    assert frozen_dtype(fp32, torch.bfloat16) == torch.float32  # bf16 emulated: fp32, as before
    assert frozen_dtype(bf16, torch.float32) == torch.float32  # an fp32 checkpoint is not rounded
    assert frozen_dtype(bf16, None) == torch.float32  # a model built in memory
    assert frozen_dtype(ComputeChoice("fp16", "cuda", "no bf16"), torch.bfloat16) == torch.float32


@pytest.mark.parametrize("is_native", [True, False])
def test_lora_holds_the_frozen_base_in_bf16_on_a_native_bf16_cpu_and_fp32_where_emulated(bf16_checkpoint, native,
                                                                                         is_native):
    native(is_native)
    peft_model = Lora.prepare(bf16_checkpoint, HealConfig(method="lora", bf16="auto"), HealContext())
    frozen = {p.dtype for p in peft_model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in peft_model.parameters() if p.requires_grad}
    assert frozen == ({torch.bfloat16} if is_native else {torch.float32})
    assert trained == {torch.float32}
    assert {b.dtype for n, b in peft_model.named_buffers() if "inv_freq" in n} <= {torch.float32}


def test_a_16bit_base_lora_heal_lowers_the_loss_and_the_merged_model_reloads(bf16_checkpoint, native, tmp_path):
    native(True)
    tokenizer = tiny_tokenizer()
    rows = tokenize_examples([Example(f"say {w}", "", f"{w} {w} {w}") for w in WORDS * 2], tokenizer,
                             max_length=64)
    config = HealConfig(method="lora", learning_rate=1e-2, max_steps=8, batch_size=8, effective_batch_size=8,
                        warmup_steps=0, bf16="auto", logging_steps=1, lora_dropout=0.0)
    result = heal(bf16_checkpoint, rows, config, tokenizer=tokenizer, work_dir=tmp_path / "w")
    losses = [entry["loss"] for entry in result.loss_curve]
    assert losses[-1] < losses[0]
    assert {p.dtype for p in result.model.parameters()} == {torch.bfloat16}  # merged into the bf16 base
    save_model(result.model, tokenizer, tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = tiny_input()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, result.model.eval()(input_ids=ids).logits)


@pytest.fixture
def bf16_pruned(tmp_path, monkeypatch):
    """A tiny Llama stored in bf16 (the teacher) and its copy without layers 1 and 2, with a text file."""
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    teacher = tiny_model("llama").to(torch.bfloat16)
    save_model(teacher, tiny_tokenizer(), tmp_path / "teacher")
    remove_layers(teacher, [1, 2], how={"chosen_by": "test"})
    save_model(teacher, tiny_tokenizer(), tmp_path / "pruned")
    (tmp_path / "text.txt").write_text(CORPUS * 4)
    return tmp_path


def spy_student_loads(monkeypatch) -> list[set]:
    """The parameter dtypes of every model the API loads to heal, as loaded (before any method casts them)."""
    loaded, load = [], api.load_model

    def spy(ref, **kwargs):
        result = load(ref, **kwargs)
        loaded.append({p.dtype for p in result.model.parameters()})
        return result

    monkeypatch.setattr(api, "load_model", spy)
    return loaded


@pytest.mark.parametrize("is_native", [True, False])
def test_a_lora_heal_loads_a_bf16_base_in_bf16_directly_where_native(bf16_pruned, native, monkeypatch, is_native):
    native(is_native)
    loaded = spy_student_loads(monkeypatch)
    result, out = api.finetune_model(str(bf16_pruned / "pruned"), out=str(bf16_pruned / "healed"), method="lora",
                                     data=str(bf16_pruned / "text.txt"), max_steps=2, max_length=24, batch_size=4,
                                     warmup_steps=0, bf16="auto")
    assert loaded == [{torch.bfloat16} if is_native else {torch.float32}]  # fp32 where bf16 is emulated, as before
    assert {p.dtype for p in result.model.parameters()} == ({torch.bfloat16} if is_native else {torch.float32})
    record = json.loads((out / "heal.json").read_text())
    assert result.steps == 2 and record["config"]["method"] == "lora"
    assert record["notes"]["frozen_dtype"] == ("bfloat16" if is_native else "float32")


def test_adapter_auto_is_resolved_before_the_load_so_a_lora_base_loads_in_bf16(bf16_pruned, native, monkeypatch):
    """The default heal (distillation) where full weights do not fit but LoRA does: the teacher pass first, then
    the student's frozen base loaded in bf16 (the decision between every weight and LoRA is made before)."""
    native(True)
    settings = dict(data=str(bf16_pruned / "text.txt"), max_steps=2, max_length=24, batch_size=4, warmup_steps=0,
                    distill_top_k=8, teacher=str(bf16_pruned / "teacher"))
    model_config = load_model(bf16_pruned / "pruned").model.config
    shape = shape_from_config(model_config)
    job = Job(layers_kept=shape.layers, batch=4, seq_len=24)
    needs = {o: heal_memory(o, shape, job, Devices("cpu", 1, GiB)).bytes_per_device for o in ("full", "lora")}
    assert needs["lora"] < needs["full"]
    monkeypatch.setattr(fit, "this_machine", lambda: Devices("cpu", 1, int((needs["lora"] + needs["full"]) / 2 /
                                                                           USABLE)))
    loaded = spy_student_loads(monkeypatch)
    api.finetune_model(str(bf16_pruned / "pruned"), out=str(bf16_pruned / "healed"), **settings)
    record = json.loads((bf16_pruned / "healed" / "heal.json").read_text())
    assert record["config"]["adapter"] == "lora" and record["notes"]["teacher_targets"]["before_student"]
    assert loaded == [{torch.bfloat16}]


def test_the_model_moves_to_the_gpu_before_its_method_prepares_it_except_under_fsdp_and_qlora(monkeypatch):
    moved = []
    model = SimpleNamespace(to=lambda device: moved.append(device) or "moved")
    monkeypatch.setattr(placement, "training_device", lambda: "cuda:1")
    assert placement.on_training_device(model, HealConfig(method="lora")) == "moved" and moved == ["cuda:1"]
    assert placement.prepared_on(HealConfig(method="lora")) == "cuda:1"
    assert placement.on_training_device(model, HealConfig(method="qlora")) is model  # its 4-bit copy goes there
    spread = SimpleNamespace(to=model.to, hf_device_map={"": 0})
    assert placement.on_training_device(spread, HealConfig(method="lora")) is spread
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate shards it
    assert placement.on_training_device(model, HealConfig(method="full")) is model
    assert placement.prepared_on(HealConfig(method="lora")) == "cpu" and moved == ["cuda:1"]
    monkeypatch.setattr(placement, "training_device", lambda: "cpu")
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert placement.on_training_device(model, HealConfig(method="full")) is model and moved == ["cuda:1"]


def test_only_a_lora_base_loads_in_16_bits(bf16_pruned, native):
    native(True)
    folder = str(bf16_pruned / "pruned")
    assert placement.student_dtype(folder, HealConfig(method="lora")) == torch.bfloat16
    assert placement.student_dtype(folder, HealConfig(method="distill", adapter="lora")) == torch.bfloat16
    assert placement.student_dtype(folder, HealConfig(method="distill", adapter="none")) == "fp32"  # trained
    assert placement.student_dtype(folder, HealConfig(method="qlora")) == "fp32"  # quantized from full precision
    assert placement.student_dtype(folder, HealConfig(method="lora", bf16=False)) == "fp32"  # computes in fp32
    fp32 = bf16_pruned / "fp32"
    save_model(copy.deepcopy(load_model(folder).model).float(), tiny_tokenizer(), fp32)
    assert placement.student_dtype(str(fp32), HealConfig(method="lora")) == "fp32"  # never rounded to 16 bits
