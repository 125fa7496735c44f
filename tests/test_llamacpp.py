"""The GGUF export runs in llama.cpp and continues a prompt exactly as transformers does (greedy).

Needs llama-cpp-python (`pip install 'layerprune[llamacpp]'`; CI installs it). Without it these tests
skip and say so.
"""

import pytest
import torch
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.export.gguf import export_gguf
from layerprune.models.saving import save_model
from layerprune.models.surgery import remove_layers
from cli_asserts import assert_one_line_error
from test_export import DROP, SHAPES, converter, export_pruned_smollm2, llama2_tokenizer  # noqa: F401  (fixture)
from tiny_models import tiny_model

llama_cpp = pytest.importorskip(
    "llama_cpp", reason="llama-cpp-python is not installed: pip install 'layerprune[llamacpp]' (CI installs it)")
runner = CliRunner()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n argmax steps over the whole sequence (no EOS stop, no cache: nothing but the model's logits)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def test_llama_cpp_continues_a_tiny_pruned_model_like_transformers(converter, tmp_path):
    from layerprune.export.llamacpp import greedy_tokens, open_gguf

    tokenizer = llama2_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=None, **SHAPES)
    remove_layers(model, DROP)
    save_model(model, tokenizer, tmp_path / "pruned")
    gguf_file = export_gguf(tmp_path / "pruned", tmp_path / "pruned-f32.gguf", "f32")  # f32: no rounding at all
    llm = open_gguf(gguf_file, n_ctx=128, threads=1)
    ids = tokenizer("hello world, the cat").input_ids
    ours = greedy_tokens(llm, ids, 16, stop_at_eos=False)
    assert ours.tokens == hf_greedy(model.eval(), ids, 16)
    assert ours.tokens_per_second > 0


def test_llama_cpp_perplexity_of_the_same_windows_equals_transformers(converter, tmp_path):
    """perplexity_windows on the f32 export == evaluation.perplexity on the model (same token windows)."""
    from layerprune.evaluation.perplexity import perplexity, window_inputs
    from layerprune.export.llamacpp import open_gguf, perplexity_windows

    tokenizer = llama2_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=None, **SHAPES)
    remove_layers(model, DROP)
    with torch.no_grad():
        model.model.norm.weight.mul_(30)  # confident logits: per-token losses from ~0.2 to ~45, not ~log(vocab)
    save_model(model, tokenizer, tmp_path / "pruned")
    gguf_file = export_gguf(tmp_path / "pruned", tmp_path / "pruned-f32.gguf", "f32")
    text = "The cat sat on the mat. A quick brown fox jumps over the lazy dog, twice! " * 3
    # llama2-style tokenizer: BOS before every window ("always"), so every text token is scored
    planned = window_inputs(tokenizer, text, seq_len=24, max_windows=5)
    assert planned.bos_used == "always" and len(planned.inputs) == 5
    expected = perplexity(model.eval(), tokenizer, text, seq_len=24, max_windows=5, progress=False)

    llm = open_gguf(gguf_file, n_ctx=64, threads=1, logits_all=True)
    ours = perplexity_windows(llm, planned.inputs, planned.score_from)
    assert ours["tokens"] == expected["tokens"] == 5 * 24
    assert ours["nll"] == pytest.approx(expected["nll"], rel=1e-4)
    swapped = [w[:1] + w[2:] + w[1:2] for w in planned.inputs]  # same tokens, other order: other loss
    assert perplexity_windows(llm, swapped, planned.score_from)["nll"] != pytest.approx(ours["nll"], rel=1e-3)
    # windows evaluated from an empty cache: the order of the windows does not matter
    again = perplexity_windows(llm, planned.inputs[::-1], planned.score_from[::-1])
    assert again["nll"] == pytest.approx(ours["nll"], rel=1e-6)

    without_all = open_gguf(gguf_file, n_ctx=64, threads=1)
    with pytest.raises(LayerpruneError, match="logits_all"):
        perplexity_windows(without_all, planned.inputs)


def test_generate_cli_errors(tmp_path):
    result = runner.invoke(app, ["generate", str(tmp_path / "missing.gguf"), "hi"])
    assert_one_line_error(result, "not found")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file")
    result = runner.invoke(app, ["generate", str(tmp_path / "bad.gguf"), "hi"])
    assert_one_line_error(result, "llama.cpp could not load")


@pytest.mark.slow
def test_llama_cpp_matches_transformers_on_pruned_smollm2_f16(converter, tmp_path):
    """The serving check: the f16 export of SmolLM2 minus 8 layers, 16 greedy tokens, llama.cpp == transformers."""
    from layerprune.export.llamacpp import greedy_tokens, open_gguf

    loaded, gguf_file = export_pruned_smollm2(tmp_path, tmp_path / "pruned-f16.gguf")
    # transformers on the same f16-rounded weights (computed in fp32), which is what llama.cpp runs
    for p in loaded.model.parameters():
        p.data = p.data.half().float()
    llm = open_gguf(gguf_file, n_ctx=256, threads=2)
    prompt = "The capital of France is"
    ids = loaded.tokenizer(prompt).input_ids
    assert llm.tokenize(prompt.encode(), add_bos=False, special=False) == ids  # same tokenizer in the GGUF
    ours = greedy_tokens(llm, ids, 16, stop_at_eos=False)
    assert ours.tokens == hf_greedy(loaded.model.eval(), ids, 16)

    result = runner.invoke(app, ["generate", str(gguf_file), "What is 2+2?", "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.output


@pytest.mark.integration
def test_quantizer_fallbacks_are_summarised_not_printed(converter, tmp_path, capfd):
    """q4_K needs 256-value rows; a 64-wide tiny model falls back, and the CLI says so in one line."""
    tokenizer = llama2_tokenizer()
    model = tiny_model("llama", vocab_size=len(tokenizer), pad_token_id=None, **SHAPES)
    save_model(model, tokenizer, tmp_path / "m")
    result = runner.invoke(app, ["export", str(tmp_path / "m"), "--quant", "q4_k_m", "--out", str(tmp_path / "q4.gguf")])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert "tensors in other types" in said and "multiples of 256" in said
    assert "llama_model_quantize" not in capfd.readouterr().err  # llama.cpp's per-tensor lines went to its log
    from layerprune.export.llamacpp import greedy_tokens, open_gguf

    assert len(greedy_tokens(open_gguf(tmp_path / "q4.gguf", n_ctx=64, threads=1), [1, 5, 6], 4,
                             stop_at_eos=False).tokens) == 4
