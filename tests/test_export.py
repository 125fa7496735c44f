"""`layerprune export`: a pruned model becomes a GGUF file that llama.cpp (and transformers) can read.

The first run fetches llama.cpp's converter (the llama-cpp-python sdist) from PyPI once; without
PyPI these tests skip and say why.
"""

import json
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.export.gguf import ensure_converter, export_gguf
from layerprune.models.saving import save_model
from layerprune.models.surgery import remove_layers
from tiny_models import CHAT_TEMPLATE, tiny_model, tiny_tokenizer
from cli_asserts import assert_one_line_error

gguf = pytest.importorskip("gguf")
runner = CliRunner()

SHAPES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
DROP = [1, 3]
SMOLLM2_DROP = [12, 13, 14, 15, 16, 17, 25, 26]


@pytest.fixture(scope="module")
def converter():
    try:
        return ensure_converter(log=lambda line: print(line, file=sys.stderr))
    except LayerpruneError as err:
        pytest.skip(f"llama.cpp's converter is not available (needs PyPI once): {err}")


def llama2_tokenizer():
    """A Llama-2-style byte-fallback BPE tokenizer (what llama.cpp's converter reads without a hash table)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + ["\u2581"] + [chr(c) for c in range(33, 127)]
    vocab = {piece: i for i, piece in enumerate(pieces)}
    backend = Tokenizer(models.BPE(vocab, [], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    tokenizer = llama2_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=None, **SHAPES)
    remove_layers(model, DROP)
    out = tmp_path_factory.mktemp("export") / "pruned"
    save_model(model, tokenizer, out)
    return out


@pytest.fixture(scope="module")
def exported(converter, pruned_dir):
    out = pruned_dir.parent / "pruned-f16.gguf"
    export_gguf(pruned_dir, out, "f16")
    return out


def field(reader, key):
    value = reader.fields[key]
    return value.contents()


def llama_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter reorders Q/K rows (LlamaModel.permute) for its rotary layout."""
    rows = weight.shape[0] // n_head // 2
    return weight.reshape(n_head, 2, rows, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def test_gguf_has_the_pruned_block_count_tokenizer_and_chat_template(exported, pruned_dir):
    reader = gguf.GGUFReader(exported)
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == 5 - len(DROP)
    assert field(reader, "llama.embedding_length") == 64
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == len(llama2_tokenizer()) and tokens[3] == "<|im_start|>"
    assert field(reader, "tokenizer.ggml.bos_token_id") == 1 and field(reader, "tokenizer.ggml.eos_token_id") == 2
    assert not any(p.name.startswith(".") for p in exported.parent.iterdir()), "no temp file left behind"


def test_f16_tensors_are_the_transformers_weights(exported, pruned_dir):
    from safetensors.torch import load_file

    config = json.loads((pruned_dir / "config.json").read_text())
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    hf = {k: v.float().numpy() for k, v in load_file(pruned_dir / "model.safetensors").items()}
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    hf_parts = {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    }
    for i in range(5 - len(DROP)):
        for g, h in hf_parts.items():
            names[f"blk.{i}.{g}.weight"] = f"model.layers.{i}.{h}.weight"
    tensors = {t.name: t for t in gguf.GGUFReader(exported).tensors}
    assert set(tensors) == set(names)
    for gname, hname in names.items():
        tensor = tensors[gname]
        got = np.asarray(tensor.data).astype(np.float32).reshape(hf[hname].shape)
        expected = hf[hname]
        if ".attn_q." in gname:
            expected = llama_permute(expected, n_head)
        elif ".attn_k." in gname:
            expected = llama_permute(expected, n_kv)
        if tensor.tensor_type == gguf.GGMLQuantizationType.F16:
            expected = expected.astype(np.float16).astype(np.float32)
        else:
            assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, gname
        np.testing.assert_array_equal(got, expected, err_msg=gname)


def test_transformers_reads_the_gguf_back(exported, pruned_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32).eval()
    back = AutoModelForCausalLM.from_pretrained(exported.parent, gguf_file=exported.name, dtype=torch.float32).eval()
    assert back.config.num_hidden_layers == 5 - len(DROP)
    tokenizer = AutoTokenizer.from_pretrained(exported.parent, gguf_file=exported.name)
    ids = llama2_tokenizer()("hello world", return_tensors="pt").input_ids
    assert tokenizer("hello world", return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        a, b = source(ids).logits, back(ids).logits
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert torch.allclose(a, b, atol=2e-2)


def test_q8_0_export(converter, pruned_dir, tmp_path):
    out = export_gguf(pruned_dir, tmp_path / "q8.gguf", "q8_0")
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert field(reader, "llama.block_count") == 5 - len(DROP)




@pytest.mark.integration
def test_cli_exports_and_refuses_an_existing_output(converter, pruned_dir, tmp_path):
    out = tmp_path / "cli.gguf"
    result = runner.invoke(app, ["export", str(pruned_dir), "--format", "gguf", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert field(gguf.GGUFReader(out), "llama.block_count") == 5 - len(DROP)
    before = out.stat().st_mtime_ns
    assert_one_line_error(runner.invoke(app, ["export", str(pruned_dir), "--out", str(out)]), "already exists")
    assert out.stat().st_mtime_ns == before


def test_cli_refuses_sublayer_removal(pruned_dir, tmp_path):
    import shutil

    model = tmp_path / "attn-only"
    shutil.copytree(pruned_dir, model)
    config = json.loads((model / "config.json").read_text())
    config["layerprune"]["removed_sublayers"] = {"attention": [0]}
    (model / "config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["export", str(model), "--out", str(tmp_path / "x.gguf")])
    assert_one_line_error(result, "attention-only/MLP-only")
    assert not (tmp_path / "x.gguf").exists()


def test_cli_surfaces_the_converter_error_for_an_unsupported_tokenizer(converter, tmp_path):
    # tests' char-level WordLevel tokenizer: llama.cpp has no pre-tokenizer for it.
    model = tiny_model("llama", **SHAPES)
    save_model(model, tiny_tokenizer(), tmp_path / "wordlevel")
    result = runner.invoke(app, ["export", str(tmp_path / "wordlevel"), "--out", str(tmp_path / "w.gguf")])
    assert_one_line_error(result, "pre-tokenizer was not recognized")
    assert not (tmp_path / "w.gguf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["wordlevel"], "no temp file left behind"


def test_cli_rejects_bad_format_and_q4_k_m_without_llama_quantize(pruned_dir, tmp_path, monkeypatch):
    result = runner.invoke(app, ["export", str(pruned_dir), "--format", "onnx", "--out", str(tmp_path / "x.gguf")])
    assert_one_line_error(result, "only gguf")
    monkeypatch.setenv("LLAMA_QUANTIZE", str(tmp_path / "no-such-binary"))
    monkeypatch.setattr("layerprune.export.gguf.have_llama_cpp", lambda: False)
    result = runner.invoke(app, ["export", str(pruned_dir), "--quant", "q4_k_m", "--out", str(tmp_path / "x.gguf")])
    assert_one_line_error(result, "llama-quantize")
    result = runner.invoke(app, ["export", str(pruned_dir), "--quant", "q3", "--out", str(tmp_path / "x.gguf")])
    assert_one_line_error(result, "unknown GGUF quantization")


def export_pruned_smollm2(tmp_path, gguf_file):
    """SmolLM2-135M (fp32) minus SMOLLM2_DROP, saved in tmp_path/pruned, exported to f16 GGUF: (loaded, GGUF path)."""
    from layerprune.models.loading import load_model

    loaded = load_model("smollm2-135m", dtype="fp32")
    remove_layers(loaded.model, SMOLLM2_DROP)
    save_model(loaded.model, loaded.tokenizer, tmp_path / "pruned")
    return loaded, export_gguf(tmp_path / "pruned", gguf_file, "f16")


@pytest.mark.slow
def test_smollm2_pruned_export_round_trip(converter, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded, out = export_pruned_smollm2(tmp_path, tmp_path / "gguf" / "smollm2-pruned-f16.gguf")
    reader = gguf.GGUFReader(out)
    assert field(reader, "llama.block_count") == 22
    assert "im_start" in field(reader, "tokenizer.chat_template")
    del reader
    back = AutoModelForCausalLM.from_pretrained(out.parent, gguf_file=out.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    prompt = "The capital of France is"
    ids = loaded.tokenizer(prompt, return_tensors="pt").input_ids
    assert tokenizer(prompt, return_tensors="pt").input_ids.tolist() == ids.tolist()
    with torch.no_grad():
        a = loaded.model(ids).logits.argmax(-1)
        b = back(ids).logits.argmax(-1)
    assert torch.equal(a, b)


def test_q4_k_m_goes_through_llama_quantize(converter, pruned_dir, tmp_path, monkeypatch):
    # A stand-in for llama.cpp's llama-quantize that records its arguments and copies the f16 file.
    fake = tmp_path / "llama-quantize"
    fake.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\ncp "$1" "$2"\n')
    fake.chmod(0o755)
    monkeypatch.setenv("LLAMA_QUANTIZE", str(fake))
    out = export_gguf(pruned_dir, tmp_path / "out" / "q4.gguf", "q4_k_m")
    assert (tmp_path / "args").read_text().split()[-1] == "Q4_K_M"
    assert field(gguf.GGUFReader(out), "llama.block_count") == 5 - len(DROP)
    assert sorted(p.name for p in out.parent.iterdir()) == ["q4.gguf"], "no temp file left behind"
