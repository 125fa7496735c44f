"""`--load-in 4bit|8bit` (bitsandbytes, CPU): quantized linears, logits near fp32, exact MACs, packed bytes,
and the eval / bench records."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from layerprune.benchmark import count_macs
from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.models.anatomy import count_parameters, parameter_bytes
from layerprune.models.loading import load_model
from layerprune.models.saving import save_model
from cli_asserts import assert_one_line_error
from tiny_models import tiny_input, tiny_model, tiny_tokenizer

bnb = pytest.importorskip("bitsandbytes", reason="--load-in needs bitsandbytes (pip install 'layerprune[qlora]')")
runner = CliRunner()
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quant") / "tiny"
    save_model(tiny_model("llama", max_position_embeddings=512), tiny_tokenizer(), out)
    return out


@pytest.fixture(scope="module")
def reference(tiny_dir):
    model = load_model(tiny_dir, dtype="fp32").model
    with torch.no_grad():
        return model, model(tiny_input()).logits


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(tiny_input()).logits


def test_4bit_quantizes_every_decoder_linear_and_stays_close_to_fp32(tiny_dir, reference):
    model = load_model(tiny_dir, load_in="4bit").model
    for layer in model.model.layers:
        for name, module in layer.named_modules():
            if name.split(".")[-1] in PROJECTIONS:
                assert type(module) is bnb.nn.Linear4bit, name
                assert module.weight.quant_state.quant_type == "nf4"
    assert type(model.lm_head) is torch.nn.Linear  # transformers keeps the output layer in full precision
    logits, fp32 = _logits(model), reference[1]
    rel = ((logits - fp32).norm() / fp32.norm()).item()
    agree = (logits.argmax(-1) == fp32.argmax(-1)).float().mean().item()
    # Close, not equal: NF4 rounds every weight (measured rel 0.33, argmax agreement 0.58 on this random model;
    # chance agreement is 1/128).
    assert 0 < rel < 0.5 and agree > 0.4
    assert torch.nn.functional.cosine_similarity(logits.flatten(), fp32.flatten(), dim=0) > 0.9


def test_4bit_in_fp32_computes_exactly_the_dequantized_weights(tiny_dir, reference):
    quantized = load_model(tiny_dir, dtype="fp32", load_in="4bit").model
    dequantized = load_model(tiny_dir, dtype="fp32").model
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                dequantized.get_submodule(name).weight.copy_(weight)
    torch.testing.assert_close(_logits(quantized), _logits(dequantized), rtol=1e-5, atol=1e-5)


def test_8bit_works_on_cpu(tiny_dir, reference):
    model = load_model(tiny_dir, load_in="8bit").model
    assert type(model.model.layers[0].mlp.up_proj) is bnb.nn.Linear8bitLt
    logits, fp32 = _logits(model), reference[1]
    rel = ((logits - fp32).norm() / fp32.norm()).item()
    assert 0 < rel < 0.05  # LLM.int8: measured 0.009


def test_quantized_sizes_count_packed_bytes_and_real_parameters(tiny_dir, reference):
    fp32 = reference[0]
    model = load_model(tiny_dir, dtype="fp32", load_in="4bit").model
    assert count_parameters(model) == count_parameters(fp32)
    expected = parameter_bytes(fp32)
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            n = module.in_features * module.out_features
            # 4 bytes -> half a byte per weight, plus one fp32 absmax per 64-weight block and the 16-entry code
            expected += -4 * n + n // 2 + 4 * -(-n // 64) + 16 * 4
    assert parameter_bytes(model) == expected
    # bitsandbytes' matmuls are custom ops FlopCounterMode can't see; hooks fill them in.
    assert count_macs(model, 16) == count_macs(fp32, 16) | {"by_op": count_macs(model, 16)["by_op"]}


def test_bad_load_in_is_refused_before_loading(tiny_dir, tmp_path):
    with pytest.raises(LayerpruneError, match="unknown --load-in '3bit'; choose 4bit or 8bit"):
        load_model(tmp_path / "no-model", load_in="3bit")
    for command in (["eval", str(tiny_dir), "--ppl", "wikitext2", "--tasks", "none"], ["bench", str(tiny_dir)]):
        out = tmp_path / "out"
        assert_one_line_error(runner.invoke(app, [*command, "--out", str(out), "--load-in", "3bit"]), "3bit")
        assert not out.exists()


@pytest.mark.integration
def test_eval_cli_records_the_quantization(tiny_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    out = tmp_path / "eval"
    result = runner.invoke(app, ["eval", str(tiny_dir), "--load-in", "4bit", "--tasks", "none", "--ppl", str(text),
                                 "--seq-len", "32", "--no-samples", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = json.loads((out / "eval.json").read_text())["model"]
    assert model["quantization"]["load_in"] == "4bit" and model["quantization"]["quant_type"] == "nf4"
    assert model["quantization"]["quantized_linears"] == len(PROJECTIONS) * 5
    assert "4bit (nf4, bitsandbytes)" in (out / "eval.md").read_text()


@pytest.mark.integration
def test_bench_compares_full_and_quantized(tiny_dir, tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(app, [
        "bench", str(tiny_dir), "--compare", str(tiny_dir), "--compare-load-in", "4bit", "--out", str(out),
        "--seq-len", "16", "--batch-sizes", "1", "--new-tokens", "4", "--warmup", "0", "--runs", "1", "--device", "cpu",
    ])
    assert result.exit_code == 0, result.output
    full, quant = json.loads((out / "bench.json").read_text())["models"]
    assert full["quantization"] is None and quant["quantization"]["load_in"] == "4bit"
    assert quant["model"].endswith("(4bit)")
    assert quant["params"]["total"] == full["params"]["total"] and quant["macs"]["macs"] == full["macs"]["macs"]
    assert quant["memory"]["weights_bytes"] < 0.7 * full["memory"]["weights_bytes"]
    assert "quantized by bitsandbytes 4bit" in (out / "bench.md").read_text()
