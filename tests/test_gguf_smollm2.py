"""The embedded SmolLM2 (a Q4_1 GGUF) pruned as a GGUF file: chosen by a metric, cut byte for byte, run by
llama.cpp, and read back by layerprune's loader as the source with the same layers removed."""

import json
import re

import pytest
import torch
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.models.builtin import builtin_gguf_path
from layerprune.models.gguf_file import PROVENANCE_KEY

pytestmark = pytest.mark.slow
gguf = pytest.importorskip("gguf")
runner = CliRunner()


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "pruned.gguf"
    result = runner.invoke(app, ["prune", "smollm2-135m", "--ratio", "0.25", "--out", str(out), "--n-samples", "8",
                                 "--seq-len", "128"])
    assert result.exit_code == 0, result.output
    return out


def test_the_kept_tensors_are_the_q4_1_file_s_own(pruned):
    source, after = gguf.GGUFReader(builtin_gguf_path("smollm2-135m")), gguf.GGUFReader(pruned)
    record = json.loads(after.fields[PROVENANCE_KEY].contents())
    kept = record["kept_layers"]
    assert len(kept) == 30 - 8 and after.fields["llama.block_count"].contents() == 22
    assert record["history"][0]["chosen_by"] == "block-influence"
    written = {t.name: t for t in after.tensors}
    for tensor in source.tensors:
        name = tensor.name
        if name.startswith("blk."):
            _, block, rest = name.split(".", 2)
            if int(block) not in kept:
                continue
            name = f"blk.{kept.index(int(block))}.{rest}"
        assert written[name].tensor_type == tensor.tensor_type and written[name].data.tobytes() == tensor.data.tobytes()
    assert pruned.stat().st_size < 0.85 * builtin_gguf_path("smollm2-135m").stat().st_size


def test_layerprune_reads_it_as_the_source_with_those_layers_removed(pruned):
    from layerprune import load_model, remove_layers

    loaded = load_model(str(pruned), dtype="fp32")
    dropped = loaded.model.config.layerprune["dropped_layers"]
    reference = remove_layers(load_model("smollm2-135m", dtype="fp32").model, dropped)
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded.model(ids).logits, reference(ids).logits)


def test_llama_cpp_generates_from_it(pruned):
    pytest.importorskip("llama_cpp")
    result = runner.invoke(app, ["generate", str(pruned), "What is the capital of France?", "--max-new-tokens", "8",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    count = re.search(r"(\d+) tokens, .* \(llama\.cpp, greedy\)", result.output)
    assert count and 1 <= int(count.group(1)) <= 8, result.output  # it may stop at the end-of-turn token


def test_a_model_comes_back_in_the_quantization_it_started_from(tmp_path):
    """export --quant same-as:the Q4_1 file: Q4_1 blocks and the Q8_0 embeddings of the original file."""
    pytest.importorskip("llama_cpp")
    from layerprune import load_model, remove_layers, save_model

    loaded = load_model("smollm2-135m", dtype="fp32")
    save_model(remove_layers(loaded.model, [12, 13, 14, 15]), loaded.tokenizer, tmp_path / "pruned")
    source = builtin_gguf_path("smollm2-135m")
    result = runner.invoke(app, ["export", str(tmp_path / "pruned"), "--quant", f"same-as:{source}",
                                 "--out", str(tmp_path / "back.gguf")])
    assert result.exit_code == 0, result.output
    back = gguf.GGUFReader(tmp_path / "back.gguf")
    types = {t.name: t.tensor_type.name for t in back.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_q.weight"] == "Q4_1"
    assert back.fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q4_1)
