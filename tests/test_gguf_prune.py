"""Pruning GGUF files directly: kept tensors byte for byte, per-layer metadata cut, original indices kept."""

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli_asserts import assert_one_line_error
from gguf_files import N_EXPERTS as MOE_EXPERTS
from gguf_files import write_gguf, write_moe_gguf
from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.models.gguf_file import DROPPED_KEY, PROVENANCE_KEY, layout, prune_gguf

gguf = pytest.importorskip("gguf")
runner = CliRunner()
ARCHS = ["llama", "qwen2", "gemma3"]
N = 8  # blocks: Gemma-3's layer 5 is its one global-attention layer


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))  # dequantized copies go here


@pytest.fixture(params=ARCHS)
def source(request, tmp_path):
    return write_gguf(tmp_path / f"{request.param}.gguf", request.param, n_blocks=N)


def renamed(name: str, kept: list[int]) -> str | None:
    """The output name of a source tensor after keeping the ORIGINAL blocks `kept` (None: dropped)."""
    if not name.startswith("blk."):
        return name
    _, block, rest = name.split(".", 2)
    return f"blk.{kept.index(int(block))}.{rest}" if int(block) in kept else None


def field(reader, key):
    return reader.fields[key].contents()


def test_every_kept_tensor_keeps_its_bytes_and_type_under_its_new_number(source, tmp_path):
    drop = [1, 2]
    result = prune_gguf(source, drop, tmp_path / "out.gguf")
    kept = [i for i in range(N) if i not in drop]
    before, after = gguf.GGUFReader(source), gguf.GGUFReader(tmp_path / "out.gguf")
    written = {t.name: t for t in after.tensors}
    expected = {renamed(t.name, kept): t for t in before.tensors if renamed(t.name, kept) is not None}
    assert set(written) == set(expected)
    for name, original in expected.items():
        copy = written[name]
        assert copy.tensor_type == original.tensor_type and list(copy.shape) == list(original.shape), name
        assert copy.data.tobytes() == original.data.tobytes(), name
    assert {t.tensor_type.name for t in after.tensors} == {"Q8_0", "F32"}  # nothing was requantized
    assert (result.layers_before, result.layers_after, result.dropped) == (N, N - 2, drop)
    assert result.bytes_after == sum(int(t.n_bytes) for t in after.tensors)


def test_metadata_is_copied_and_per_layer_arrays_keep_the_kept_layers(tmp_path):
    per_layer = {"llama.attention.head_count_kv": ([2, 1, 2, 1, 2, 1, 2, 1], gguf.GGUFValueType.ARRAY,
                                                   gguf.GGUFValueType.UINT32),
                 "llama.feed_forward_length": ([100 + i for i in range(N)], gguf.GGUFValueType.ARRAY,
                                               gguf.GGUFValueType.UINT32)}
    source = write_gguf(tmp_path / "src.gguf", "llama", n_blocks=N, extra_metadata=per_layer)
    prune_gguf(source, [0, 3, 4], tmp_path / "out.gguf")
    before, after = gguf.GGUFReader(source), gguf.GGUFReader(tmp_path / "out.gguf")
    assert field(after, "llama.block_count") == N - 3
    assert field(after, "llama.feed_forward_length") == [101, 102, 105, 106, 107]
    assert field(after, "llama.attention.head_count_kv") == [1, 2, 1, 2, 1]
    assert field(after, DROPPED_KEY) == [0, 3, 4]
    record = json.loads(field(after, PROVENANCE_KEY))
    assert record["kept_layers"] == [1, 2, 5, 6, 7] and record["original_num_layers"] == N
    changed = {"llama.block_count", "llama.feed_forward_length", "llama.attention.head_count_kv"}
    for key, value in before.fields.items():  # the tokenizer, names, everything else: the same bytes
        if not key.startswith("GGUF.") and key not in changed:
            assert [p.tobytes() for p in value.parts] == [p.tobytes() for p in after.fields[key].parts], key


def test_gemma3_sliding_window_layers_stay_those_of_the_original_layers(tmp_path):
    source = write_gguf(tmp_path / "gemma3.gguf", "gemma3", n_blocks=N)
    assert layout(source).sliding == [True] * 5 + [False] + [True] * 2  # llama.cpp's rule: every 6th is global
    prune_gguf(source, [1, 2], tmp_path / "out.gguf")
    flags = field(gguf.GGUFReader(tmp_path / "out.gguf"), "gemma3.attention.sliding_window_pattern")
    # kept 0,3,4,5,6,7: original 5 (now 3) stays global, original 7 (now 5) stays sliding
    assert flags == [True, True, True, False, True, True]


@pytest.mark.integration
def test_transformers_reads_the_pruned_file_as_the_source_with_those_layers_removed(source, tmp_path):
    from layerprune.models.loading import load_model
    from layerprune.models.surgery import remove_layers

    drop = [1, 2]
    prune_gguf(source, drop, tmp_path / "out.gguf")
    pruned = load_model(str(tmp_path / "out.gguf"), dtype="fp32")
    reference = remove_layers(load_model(str(source), dtype="fp32").model, drop)
    ids = torch.tensor([pruned.tokenizer("the cat then sat, the hat there " * 3).input_ids])
    with torch.no_grad():
        assert torch.equal(pruned.model(ids).logits, reference(ids).logits)
    assert pruned.model.config.layerprune["kept_layers"] == [0, 3, 4, 5, 6, 7]
    if "gemma3" in source.name:  # transformers alone would number the global layer from the new count
        assert pruned.model.config.layer_types == reference.config.layer_types
        assert pruned.model.config.layer_types[3] == "full_attention"


def test_a_second_prune_speaks_original_indices(tmp_path):
    source = write_gguf(tmp_path / "src.gguf", "llama", n_blocks=N)
    prune_gguf(source, [1], tmp_path / "once.gguf")
    prune_gguf(tmp_path / "once.gguf", [3, 6], tmp_path / "twice.gguf")
    prune_gguf(source, [1, 3, 6], tmp_path / "direct.gguf")
    twice, direct = gguf.GGUFReader(tmp_path / "twice.gguf"), gguf.GGUFReader(tmp_path / "direct.gguf")
    assert [(t.name, t.data.tobytes()) for t in twice.tensors] == [(t.name, t.data.tobytes()) for t in direct.tensors]
    record = json.loads(field(twice, PROVENANCE_KEY))
    assert record["dropped_layers"] == [1, 3, 6] and [h["dropped"] for h in record["history"]] == [[1], [3, 6]]
    with pytest.raises(LayerpruneError, match="layer 1 was already removed"):
        prune_gguf(tmp_path / "once.gguf", [1], tmp_path / "again.gguf")


def test_refusals_leave_every_file_as_it_was(tmp_path):
    source = write_gguf(tmp_path / "src.gguf", "llama", n_blocks=N)
    original = source.read_bytes()
    with pytest.raises(LayerpruneError, match="is the input"):
        prune_gguf(source, [1], source, overwrite=True)
    (tmp_path / "taken.gguf").write_text("mine")
    with pytest.raises(LayerpruneError, match="already exists"):
        prune_gguf(source, [1], tmp_path / "taken.gguf")
    with pytest.raises(LayerpruneError, match="cannot drop all"):
        prune_gguf(source, list(range(N)), tmp_path / "none.gguf")
    assert source.read_bytes() == original and (tmp_path / "taken.gguf").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf", "taken.gguf"]  # no temp left


def test_cli_refuses_an_unsupported_architecture_in_one_line(tmp_path):
    other = write_gguf(tmp_path / "gpt2.gguf", "llama", n_blocks=2)
    data = bytearray(other.read_bytes())
    at = data.index(b"llama")  # general.architecture's value, same length
    data[at:at + 5] = b"bloom"
    (tmp_path / "bloom.gguf").write_bytes(bytes(data))
    result = runner.invoke(app, ["prune", str(tmp_path / "bloom.gguf"), "--drop", "1", "--out", str(tmp_path / "o.gguf")])
    assert_one_line_error(result, "GGUF architecture 'bloom' is not supported")
    assert not (tmp_path / "o.gguf").exists()


def test_cli_refuses_a_gguf_output_from_a_folder_model(tiny_dir, tmp_path):
    result = runner.invoke(app, ["prune", str(tiny_dir), "--drop", "1", "--out", str(tmp_path / "o.gguf")])
    assert_one_line_error(result, "a .gguf output is cut from a GGUF model")


def test_cli_info_shows_quantization_groups_and_history(tmp_path):
    source = write_gguf(tmp_path / "src.gguf", "gemma3", n_blocks=N)
    result = runner.invoke(app, ["prune", str(source), "--drop", "1,2", "--out", str(tmp_path / "out.gguf")])
    assert result.exit_code == 0, result.output
    info = runner.invoke(app, ["info", str(tmp_path / "out.gguf")], terminal_width=200)
    assert info.exit_code == 0, info.output
    lines = {line.split("│")[1].strip(): line.split("│")[2].strip() for line in info.output.splitlines()
             if line.count("│") == 3}
    assert lines["layers"] == "6 (original 8)" and lines["dropped (original indices)"] == "1,2"
    assert lines["attention tensors"] == "24 x Q8_0" and lines["norms tensors"] == "37 x F32"  # 6 per block + output_norm
    assert lines["global-attention layers"] == "3"


@pytest.mark.integration
def test_choosing_by_a_metric_cuts_the_same_layers_as_a_folder_prune(tmp_path):
    """--num-layers on a GGUF: chosen on the dequantized model, exactly the folder prune's drop-set."""
    source = write_gguf(tmp_path / "src.gguf", "qwen2", n_blocks=N)
    (tmp_path / "text.txt").write_text("the cat then sat there, the hat then sat there. " * 40)
    common = ["--num-layers", "2", "--metric", "block-influence", "--calib", str(tmp_path / "text.txt"),
              "--n-samples", "4", "--seq-len", "32"]
    as_gguf = runner.invoke(app, ["prune", str(source), "--out", str(tmp_path / "out.gguf"), *common])
    as_folder = runner.invoke(app, ["prune", str(source), "--out", str(tmp_path / "folder"), *common])
    assert as_gguf.exit_code == 0 and as_folder.exit_code == 0, as_gguf.output + as_folder.output
    record = json.loads(field(gguf.GGUFReader(tmp_path / "out.gguf"), PROVENANCE_KEY))
    folder = json.loads((tmp_path / "folder" / "config.json").read_text())["layerprune"]
    assert record["dropped_layers"] == folder["dropped_layers"] and len(record["dropped_layers"]) == 2
    assert record["history"][0]["chosen_by"] == "block-influence"


def test_llama_cpp_runs_the_pruned_gemma3_like_transformers(tmp_path):
    """The explicit sliding-window flags are what make llama.cpp agree: without them it differs."""
    pytest.importorskip("llama_cpp")
    from layerprune.export.llamacpp import open_gguf, perplexity_windows
    from layerprune.models.loading import load_model

    source = write_gguf(tmp_path / "gemma3.gguf", "gemma3", n_blocks=N, seed=3)
    prune_gguf(source, [1, 2], tmp_path / "out.gguf")
    pruned = load_model(str(tmp_path / "out.gguf"), dtype="fp32")
    ids = pruned.tokenizer("the cat then sat there, the hat then sat there, then the cat sat " * 3).input_ids
    with torch.no_grad():
        logits = pruned.model(torch.tensor([ids])).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    llm = open_gguf(tmp_path / "out.gguf", n_ctx=256, threads=1, logits_all=True)
    measured = perplexity_windows(llm, [ids], 1)["nll"]
    assert measured == pytest.approx(expected, rel=1e-3)
    # the same file without the flags: llama.cpp takes its every-6th rule on the new numbers
    reader = gguf.GGUFReader(tmp_path / "out.gguf")
    writer = gguf.GGUFWriter(tmp_path / "no-flags.gguf", "gemma3")
    for key, value in reader.fields.items():
        if not key.startswith("GGUF.") and key not in ("general.architecture", "gemma3.attention.sliding_window_pattern"):
            from layerprune.models.gguf_file import field_value

            writer.add_key_value(key, field_value(value), value.types[0],
                                 sub_type=value.types[1] if len(value.types) > 1 else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data), raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    wrong = perplexity_windows(open_gguf(tmp_path / "no-flags.gguf", n_ctx=256, threads=1, logits_all=True), [ids], 1)
    assert wrong["nll"] != pytest.approx(expected, rel=1e-3)


def test_same_as_reads_the_file_type_and_the_embedding_type(tmp_path):
    from layerprune.export.gguf import same_quantization_as

    q8 = write_gguf(tmp_path / "q8.gguf", "llama", n_blocks=2)
    assert same_quantization_as(q8) == ("q8_0", {})  # the converter writes q8_0 itself
    q4_1 = write_gguf(tmp_path / "q4_1.gguf", "llama", n_blocks=2, extra_metadata={
        "general.file_type": (int(gguf.LlamaFileType.MOSTLY_Q4_1), gguf.GGUFValueType.UINT32, None)})
    q8_type = int(gguf.GGMLQuantizationType.Q8_0)
    assert same_quantization_as(q4_1) == ("q4_1", {"token_embedding_type": q8_type, "output_tensor_type": q8_type})
    with pytest.raises(LayerpruneError, match="no such GGUF file"):
        same_quantization_as(tmp_path / "missing.gguf")


def test_cli_format_gguf_writes_a_gguf_whatever_the_name(tmp_path):
    source = write_gguf(tmp_path / "src.gguf", "llama", n_blocks=N)
    result = runner.invoke(app, ["prune", str(source), "--drop", "2", "--format", "gguf", "--out",
                                 str(tmp_path / "pruned.bin")])
    assert result.exit_code == 0, result.output
    assert field(gguf.GGUFReader(tmp_path / "pruned.bin"), "llama.block_count") == N - 1
    bad = runner.invoke(app, ["prune", str(source), "--drop", "2", "--format", "onnx", "--out", str(tmp_path / "x")])
    assert_one_line_error(bad, "unknown output format 'onnx'")


# ------------------------------------------------------------------------------------- experts
MOE_ARCHS = ["qwen2moe", "qwen3moe", "llama"]


def tensor_bytes(path) -> dict[str, bytes]:
    return {t.name: bytes(np.asarray(t.data).tobytes()) for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_cut_equals_a_file_written_with_those_experts(arch, tmp_path):
    """Cut = the file written from the same weights with only the kept experts: every byte, and llama.cpp's logits."""
    source = write_moe_gguf(tmp_path / "src.gguf", arch)
    cut = {0: [1, 6], 1: [0, 7], 2: [3, 4]}
    kept = {block: [e for e in range(MOE_EXPERTS) if e not in gone] for block, gone in cut.items()}
    result = prune_gguf(source, [], tmp_path / "out.gguf", drop_experts=cut)
    reference = write_moe_gguf(tmp_path / "ref.gguf", arch, experts=kept)
    assert tensor_bytes(tmp_path / "out.gguf") == tensor_bytes(reference)
    assert field(gguf.GGUFReader(tmp_path / "out.gguf"), f"{arch}.expert_count") == MOE_EXPERTS - 2
    assert result.experts["dropped"] == {str(k): v for k, v in cut.items()} and result.bytes_after < result.bytes_before
    record = json.loads(field(gguf.GGUFReader(tmp_path / "out.gguf"), PROVENANCE_KEY))
    assert record["experts"]["kept"] == {str(k): v for k, v in kept.items()}
    pytest.importorskip("llama_cpp")
    from layerprune.export.llamacpp import open_gguf

    ids = [1, 40, 50, 60, 70, 80]
    runs = []
    for path in (tmp_path / "out.gguf", reference):
        llm = open_gguf(path, n_ctx=64, threads=1, logits_all=True)
        llm.eval(ids)
        runs.append(np.array(llm.scores[: len(ids)]))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_layers_and_experts_from_a_gguf_file(tmp_path):
    source = write_moe_gguf(tmp_path / "src.gguf", "qwen3moe")
    prune_gguf(source, [1], tmp_path / "out.gguf", drop_experts={0: [2, 3], 2: [4, 5]})
    reference = write_moe_gguf(tmp_path / "ref.gguf", "qwen3moe", blocks=[0, 2],
                               experts={0: [0, 1, 4, 5, 6, 7], 2: [0, 1, 2, 3, 6, 7]})
    assert tensor_bytes(tmp_path / "out.gguf") == tensor_bytes(reference)
    # a second cut speaks ORIGINAL indices, and refuses what already went
    prune_gguf(tmp_path / "out.gguf", [], tmp_path / "again.gguf", drop_experts={0: [0], 2: [7]})
    record = json.loads(field(gguf.GGUFReader(tmp_path / "again.gguf"), PROVENANCE_KEY))
    assert record["experts"]["dropped"] == {"0": [0, 2, 3], "2": [4, 5, 7]} and record["kept_layers"] == [0, 2]
    with pytest.raises(LayerpruneError, match="already removed"):
        prune_gguf(tmp_path / "again.gguf", [], tmp_path / "bad.gguf", drop_experts={0: [2], 2: [1]})


def test_gguf_expert_cuts_refused(tmp_path):
    source = write_moe_gguf(tmp_path / "src.gguf", "qwen2moe")
    for cut, message in [({0: [1]}, "every MoE layer must keep as many"), ({0: [8], 1: [1], 2: [1]}, "out of range"),
                         ({b: list(range(7)) for b in range(3)}, "num_experts_per_tok=2")]:
        with pytest.raises(LayerpruneError, match=message):
            prune_gguf(source, [], tmp_path / "out.gguf", drop_experts=cut)
        assert not (tmp_path / "out.gguf").exists()
    dense = write_gguf(tmp_path / "dense.gguf", "llama", n_blocks=2)
    with pytest.raises(LayerpruneError, match="has no experts to remove"):
        prune_gguf(dense, [], tmp_path / "out.gguf", drop_experts={0: [1]})


def test_cli_cuts_experts_from_a_gguf_file(tmp_path):
    source = write_moe_gguf(tmp_path / "src.gguf", "qwen2moe")
    result = runner.invoke(app, ["prune", str(source), "--out", str(tmp_path / "out.gguf"),
                                 "--drop-experts", "0:1,2;1:3,4;2:5,6"])
    assert result.exit_code == 0, result.output
    assert "layer 2: 5,6" in result.output
    assert field(gguf.GGUFReader(tmp_path / "out.gguf"), "qwen2moe.expert_count") == MOE_EXPERTS - 2
    bad = runner.invoke(app, ["prune", str(source), "--out", str(tmp_path / "bad.gguf"), "--expert-ratio", "0.25"])
    assert_one_line_error(bad, "a GGUF file loses the experts given by --drop-experts")
    assert not (tmp_path / "bad.gguf").exists()


def test_info_shows_the_experts_of_a_gguf_file(tmp_path):
    source = write_moe_gguf(tmp_path / "src.gguf", "qwen3moe")
    prune_gguf(source, [1], tmp_path / "out.gguf", drop_experts={0: [2, 3], 2: [4, 5]})
    result = runner.invoke(app, ["info", str(tmp_path / "out.gguf")], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"6 (original {MOE_EXPERTS})" in result.output and "experts removed, layer 2" in result.output
    assert "dropped 1 (" in result.output


def test_loading_a_gguf_that_transformers_reads_incompletely_is_refused(tmp_path, monkeypatch):
    """A Mixtral-style `llama` file with experts: transformers would read a dense Llama with random MLPs."""
    from layerprune.models.loading import load_model

    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))
    source = write_moe_gguf(tmp_path / "mixtral.gguf", "llama")
    with pytest.raises(LayerpruneError, match="without weights for model.layers.0.mlp"):
        load_model(str(source), dtype="fp32")
