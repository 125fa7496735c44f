"""How layerprune computes: bf16 only where the hardware computes it natively, and every heal path asks."""

import pytest
import torch

from layerprune.data.instructions import Example, tokenize_examples
from layerprune.finetune import HealConfig, heal
from layerprune.hardware import compute
from layerprune.hardware.compute import cpu_flags, decide_compute, isa_names, load_dtype
from tiny_models import tiny_model, tiny_tokenizer

AVX2_ONLY = "processor : 0\nmodel name : AMD EPYC 7B12\nflags : fpu sse2 avx avx2 fma\n"
SAPPHIRE = "processor : 0\nmodel name : Intel Xeon\nflags : avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"


def test_an_avx2_only_cpu_computes_in_fp32():
    choice = decide_compute("cpu", "auto", cpu_bf16=False)
    assert (choice.dtype, choice.mixed) == ("fp32", False)
    assert "no native bf16" in choice.reason


def test_a_cpu_with_native_bf16_computes_in_bf16():
    choice = decide_compute("cpu", "auto", cpu_bf16=True)
    assert choice.dtype == "bf16" and choice.torch_dtype == torch.bfloat16


@pytest.mark.parametrize("native", [True, False])
def test_an_explicit_setting_always_wins(native):
    assert decide_compute("cpu", True, cpu_bf16=native).dtype == "bf16"
    assert decide_compute("cpu", False, cpu_bf16=native).dtype == "fp32"
    assert decide_compute("cuda", False, cuda_bf16=native).dtype == "fp32"
    assert decide_compute("cpu", "fp16", cpu_bf16=native).dtype == "fp16"


def test_gpus_take_bf16_where_supported_else_fp16():
    assert decide_compute("cuda:1", "auto", cuda_bf16=True).dtype == "bf16"
    assert decide_compute("cuda", "auto", cuda_bf16=False).dtype == "fp16"
    assert decide_compute("mps", None, mps_bf16=False).dtype == "fp16"


def test_an_unknown_setting_is_refused():
    from layerprune.errors import LayerpruneError

    with pytest.raises(LayerpruneError, match="unknown compute setting"):
        decide_compute("cpu", "int8")


def test_cpu_flags_and_isa_names_read_cpuinfo():
    assert isa_names(cpu_flags(AVX2_ONLY)) == ["AVX2"]
    assert isa_names(cpu_flags(SAPPHIRE)) == ["AVX2", "AVX512", "AVX512-BF16", "AMX-BF16"]
    assert compute.cpu_model_name(AVX2_ONLY) == "AMD EPYC 7B12"


def test_a_cpu_without_the_flags_is_not_native_whatever_the_probe(monkeypatch):
    compute.cpu_bf16_support.cache_clear()
    monkeypatch.setattr(compute, "cpu_flags", lambda cpuinfo=None: cpu_flags(AVX2_ONLY))
    monkeypatch.setattr(compute, "bf16_matmul_ratio", lambda: pytest.fail("no probe without the flags"))
    try:
        assert compute.cpu_native_bf16() is False
        assert compute.compute_choice("cpu").dtype == "fp32"
    finally:
        compute.cpu_bf16_support.cache_clear()


def test_flags_without_fast_bf16_matmuls_are_not_native(monkeypatch):
    """An emulation (ONEDNN_MAX_CPU_ISA=AVX2) or a VM can keep the flags while bf16 runs emulated."""
    compute.cpu_bf16_support.cache_clear()
    monkeypatch.setattr(compute, "cpu_flags", lambda cpuinfo=None: cpu_flags(SAPPHIRE))
    monkeypatch.setattr(compute, "torch_cpu_capability", lambda: "AVX512")
    try:
        monkeypatch.setattr(compute, "bf16_matmul_ratio", lambda: 26.0)
        native, why = compute.cpu_bf16_support()
        assert not native and "26x slower" in why
        compute.cpu_bf16_support.cache_clear()
        monkeypatch.setattr(compute, "bf16_matmul_ratio", lambda: 0.4)
        assert compute.cpu_bf16_support()[0] is True
    finally:
        compute.cpu_bf16_support.cache_clear()


def test_bf16_weights_load_in_fp32_where_bf16_is_emulated(monkeypatch):
    monkeypatch.setattr(compute, "cpu_native_bf16", lambda: False)
    dtype, why = load_dtype("auto", torch.bfloat16, "cpu")
    assert dtype == torch.float32 and "emulated" in why
    assert load_dtype("bf16", torch.bfloat16, "cpu") == ("bf16", None)  # asked for: kept
    assert load_dtype("auto", torch.float32, "cpu") == ("auto", None)
    monkeypatch.setattr(compute, "cpu_native_bf16", lambda: True)
    assert load_dtype("auto", torch.bfloat16, "cpu") == ("auto", None)


def _autocast_seen(model) -> list:
    """Record the dtype the first linear layer's output has on each forward (bf16 under bf16 autocast)."""
    seen = []
    linear = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    linear.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    return seen


@pytest.mark.parametrize("native", [False, True])
def test_the_teacher_pass_and_the_trainer_compute_as_the_hardware_decides(native, monkeypatch, tmp_path):
    from layerprune import remove_layers

    monkeypatch.setattr(compute, "cpu_bf16_support", lambda: (native, "patched"))
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    tokenizer = tiny_tokenizer()
    rows = tokenize_examples([Example(f"say {w}", "", f"{w} {w}") for w in ["cat", "dog", "owl", "sun"]],
                             tokenizer, max_length=32)
    teacher = tiny_model("llama")
    student = tiny_model("llama")
    remove_layers(student, [1])
    teacher_seen, student_seen = _autocast_seen(teacher), _autocast_seen(student)
    config = HealConfig(method="distill", max_steps=2, batch_size=2, warmup_steps=0, logging_steps=1)
    result = heal(student, rows, config, tokenizer=tokenizer, teacher=teacher, work_dir=tmp_path / "work",
                  log=lambda line: None)
    expected = torch.bfloat16 if native else torch.float32
    assert teacher_seen and set(teacher_seen) == {expected}
    assert student_seen and set(student_seen) == {expected}
    assert result.notes["compute"]["dtype"] == ("bf16" if native else "fp32")
