"""Calibration sampling and the step from scores to the layers to drop."""

import gzip
import json

import pytest
import torch

from layerprune import LayerpruneError, LayerScores, compute_scores, select_layers
from layerprune.data.calibration import calibration_from_texts, load_calibration
from layerprune.data.sources import read_bundled_lines, read_texts
from tiny_models import CharTokenizer, tiny_model

TEXTS = [f"document number {i} " * 20 for i in range(30)]


def test_concat_windows_are_full_and_seeded():
    a = calibration_from_texts(CharTokenizer(), TEXTS, n_samples=4, seq_len=16, seed=0)
    b = calibration_from_texts(CharTokenizer(), TEXTS, n_samples=4, seq_len=16, seed=0)
    c = calibration_from_texts(CharTokenizer(), TEXTS, n_samples=4, seq_len=16, seed=1)
    assert a.input_ids.shape == (4, 16) and bool(a.attention_mask.all())
    assert torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
    assert a.description["bos"] is False and a.description["tokens"] == 64


def test_bos_follows_the_tokenizer():
    calib = calibration_from_texts(CharTokenizer(add_bos=True), TEXTS, n_samples=3, seq_len=8)
    assert calib.description["bos"] is True
    assert calib.input_ids[:, 0].tolist() == [1, 1, 1]


def test_document_mode_pads_and_masks():
    calib = calibration_from_texts(CharTokenizer(), ["ab", "abcdefghijkl"], n_samples=2, seq_len=8, mode="document")
    lengths = sorted(calib.attention_mask.sum(1).tolist())
    assert lengths == [2, 8]


@pytest.mark.parametrize("texts, n, message", [([], 2, "has no text"), (["  "], 2, "has no text"), (["short"], 2, "too short")])
def test_empty_or_short_calibration_is_refused(texts, n, message):
    with pytest.raises(LayerpruneError, match=message):
        calibration_from_texts(CharTokenizer(), texts, n_samples=n, seq_len=16)


def test_bundled_corpora_match_their_manifest_sizes():
    # the one file serves two slices: c4 (calibration, selection, healing) and c4-heldout (evaluation only)
    assert len(read_texts("c4")) == 1200 and len(read_texts("c4-heldout")) == 300
    assert read_texts("c4-heldout")[0] not in read_texts("c4")
    assert len(read_bundled_lines("wikitext2")) == 4358
    assert len(read_bundled_lines("ptb")) == 3761


def test_jsonl_and_text_files(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": f"row {i}"}) for i in range(3)) + "\n")
    assert read_texts(str(jsonl), field="body") == ["row 0", "row 1", "row 2"]
    with pytest.raises(LayerpruneError, match="no field 'text'"):
        read_texts(str(jsonl))
    txt = tmp_path / "d.txt"
    txt.write_text("first doc\nstill first\n\nsecond doc\n")
    assert read_texts(str(txt)) == ["first doc\nstill first", "second doc"]
    with gzip.open(tmp_path / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    assert read_texts(str(tmp_path / "d.jsonl.gz")) == ["zipped"]
    with pytest.raises(LayerpruneError, match="unknown text source"):
        read_texts("no-such-corpus")


def test_load_calibration_from_bundled_c4():
    calib = load_calibration(CharTokenizer(), "c4", n_samples=10, seq_len=128)
    assert calib.input_ids.shape == (10, 128) and calib.description["source"] == "c4"


def scores(values, metric="m", **params):
    return LayerScores(metric=metric, layers=list(range(len(values))), values=values, params=params)


def test_lowest_scores_are_dropped_and_ties_go_deeper():
    assert select_layers(scores([5.0, 1.0, 3.0, 1.0, 4.0]), num_layers=2).dropped == [1, 3]
    assert select_layers(scores([2.0, 1.0, 1.0, 1.0, 4.0]), num_layers=2).dropped == [2, 3]
    assert select_layers(scores([5.0, 1.0, 3.0, 2.0, 4.0]), ratio=0.4).dropped == [1, 3]


def test_protected_layers_are_never_dropped():
    selection = select_layers(scores([0.0, 1.0, 2.0, 3.0, 0.5]), num_layers=2, protect_first=1, protect_last=1)
    assert selection.dropped == [1, 2]
    with pytest.raises(LayerpruneError, match="only 1 are not protected"):
        select_layers(scores([0.0] * 5), num_layers=2, protect_first=2, protect_last=2)


def test_block_metric_drops_the_best_contiguous_block():
    nan = float("nan")
    block = scores([0.5, 0.2, 0.3, 0.1, nan], metric="angular", block_size=2)
    assert select_layers(block, num_layers=2).dropped == [3, 4]
    assert select_layers(block, num_layers=2, protect_last=1).dropped == [1, 2]
    with pytest.raises(LayerpruneError, match="blocks of 2"):
        select_layers(block, num_layers=3)


def test_reverse_order_drops_the_last_layers_and_sequential_the_first():
    model = tiny_model("llama")
    assert select_layers(compute_scores(model, "reverse-order"), num_layers=2).dropped == [3, 4]
    assert select_layers(compute_scores(model, "sequential"), num_layers=2).dropped == [0, 1]
    a, b = compute_scores(model, "random", seed=3), compute_scores(model, "random", seed=3)
    assert a.values == b.values and sorted(a.values) == [0.0, 1.0, 2.0, 3.0, 4.0]
