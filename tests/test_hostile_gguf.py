"""GGUF files whose header lies are refused in one line naming the problem, before any weight is read, on
every path that reads them: prune (GGUF out and folder out), info, and the conversion that eval, plan,
export and the layer-by-layer paths go through (docs/safety.md)."""

import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from layerprune.cli import app
from layerprune.errors import LayerpruneError
from layerprune.models.gguf_file import field_value
from layerprune.models.loading import model_folder
from cli_asserts import assert_one_line_error
from gguf_files import write_gguf

gguf = pytest.importorskip("gguf")
runner = CliRunner()
N = 6


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERPRUNE_CACHE", str(tmp_path / "cache"))


def rewritten(source, target, *, fields=None, tensors=None):
    """A copy of the GGUF `source` with its metadata ({key: (value, type, sub_type)}) and its tensors
    ([(name, data, type)]) passed through `fields` and `tensors`."""
    reader = gguf.GGUFReader(source)
    metadata = {key: (field_value(f), f.types[0], f.types[1] if len(f.types) > 1 else None)
                for key, f in reader.fields.items() if not key.startswith("GGUF.") and key != "general.architecture"}
    items = [(t.name, np.asarray(t.data), t.tensor_type) for t in reader.tensors]
    writer = gguf.GGUFWriter(target, "llama")
    for key, (value, kind, sub) in (fields(metadata) if fields else metadata).items():
        writer.add_key_value(key, value, kind, sub_type=sub)
    for name, data, kind in (tensors(items) if tensors else items):
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def patched(source, target, change):
    """A byte copy of `source` with `change(reader)` written into its header in place."""
    shutil.copy(source, target)
    reader = gguf.GGUFReader(target, "r+")
    change(reader)
    reader.data.flush()
    del reader
    return target


def claims_8_blocks(r):
    r.fields["llama.block_count"].parts[-1][0] = 8


def claims_2_to_the_31_blocks(r):
    r.fields["llama.block_count"].parts[-1][0] = 2**31


def overlapping(r):
    offsets = {t.name: t.field.parts[-1] for t in r.tensors}
    offsets["blk.1.attn_q.weight"][0] = offsets["blk.0.attn_q.weight"][0]


def with_fields(change):
    def edit(metadata):
        change(metadata)
        return metadata
    return edit


LIES = {
    "block_count says 8 of 6": (lambda src, dst: patched(src, dst, claims_8_blocks),
                                "llama.block_count says 8 blocks, but the file has no tensors of blk.6, blk.7"),
    "block_count says 2**31": (lambda src, dst: patched(src, dst, claims_2_to_the_31_blocks),
                               "says 2147483648 blocks, but the file has no tensors of blk.6, blk.7, blk.8, blk.9, "
                               "blk.10 ..."),
    "no blk.1": (lambda src, dst: rewritten(src, dst, tensors=lambda ts: [t for t in ts if not t[0].startswith(
                 "blk.1.")]), "has no tensors of blk.1"),
    "blk.1 and blk.01": (lambda src, dst: rewritten(src, dst, tensors=lambda ts: ts + [
                         (t[0].replace("blk.1.", "blk.01."), t[1], t[2]) for t in ts if t[0].startswith("blk.1.")]),
                         "has a block number written '01'"),
    "a block lacks a tensor": (lambda src, dst: rewritten(src, dst, tensors=lambda ts: [
                               t for t in ts if t[0] != "blk.2.ffn_up.weight"]), "blk.2 lacks ffn_up.weight"),
    "per-layer array too short": (lambda src, dst: rewritten(src, dst, fields=with_fields(
                                  lambda m: m.update({"llama.feed_forward_length": (
                                      [64] * (N - 1), gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32)}))),
                                  f"llama.feed_forward_length has {N - 1} entries for llama.block_count={N}"),
    "overlapping tensor data": (lambda src, dst: patched(src, dst, overlapping),
                                "the data of tensors blk.0.attn_q.weight and blk.1.attn_q.weight overlap"),
}


@pytest.fixture(params=list(LIES))
def lie(request, tmp_path):
    source = write_gguf(tmp_path / "honest.gguf", "llama", n_blocks=N)
    make, message = LIES[request.param]
    path = make(source, tmp_path / "lying.gguf")
    return path, message


def test_prune_refuses_a_lying_gguf_and_writes_nothing(lie, tmp_path):
    path, message = lie
    before = path.read_bytes()
    for out in ("pruned.gguf", "pruned"):  # GGUF out (direct cut) and a folder (through the conversion)
        result = runner.invoke(app, ["prune", str(path), "--drop", "3", "--out", str(tmp_path / out)])
        assert_one_line_error(result, message)
        assert not (tmp_path / out).exists()
    assert path.read_bytes() == before


def test_info_refuses_a_lying_gguf(lie):
    path, message = lie
    assert_one_line_error(runner.invoke(app, ["info", str(path)]), message)


def test_the_conversion_refuses_a_lying_gguf_before_transformers_reads_it(lie, tmp_path, monkeypatch):
    path, message = lie
    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(LayerpruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_folder(str(path))
    assert not any((tmp_path / "cache").rglob("config.json"))


def test_an_honest_gguf_still_passes(tmp_path):
    source = write_gguf(tmp_path / "honest.gguf", "llama", n_blocks=N)
    result = runner.invoke(app, ["prune", str(source), "--drop", "3", "--out", str(tmp_path / "pruned.gguf")])
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["info", str(tmp_path / "pruned.gguf")]).exit_code == 0
