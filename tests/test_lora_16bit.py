"""LoRA over a 16-bit frozen base: the base stays in the checkpoint's bf16 where the device computes bf16
natively (hardware/compute.py decides), fp32 where bf16 is emulated; adapters and optimizer state are fp32."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from layerprune import save_model
from layerprune.data.instructions import Example, tokenize_examples
from layerprune.finetune import HealConfig, heal
from layerprune.finetune.methods import HealContext, Lora
from layerprune.hardware import compute
from layerprune.hardware.compute import ComputeChoice, frozen_dtype
from layerprune.models.loading import load_model
from tiny_models import tiny_input, tiny_model, tiny_tokenizer

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
