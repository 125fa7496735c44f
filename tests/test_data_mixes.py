"""Training data mixes: general text and instruction data, each tokenized as its kind, interleaved in
proportion."""

import json

import pytest

from layerprune import LayerpruneError
from layerprune.finetune.stage import prepare_training_rows
from layerprune.models.tokens import IGNORE_INDEX
from layerprune.data.mixes import interleave, parse_mix
from layerprune.finetune import HealConfig
from tiny_models import CORPUS, tiny_tokenizer


def test_parse_mix():
    assert parse_mix("c4+dolly") == [("c4", 1.0), ("dolly", 1.0)]
    assert parse_mix("c4:3+dolly:1") == [("c4", 3.0), ("dolly", 1.0)]
    assert parse_mix("/data/a:b.txt+dolly:0.5") == [("/data/a:b.txt", 1.0), ("dolly", 0.5)]  # not a number
    for bad in ("c4+", "c4:0+dolly", "c4:-1+dolly", "c4+c4"):
        with pytest.raises(LayerpruneError):
            parse_mix(bad)


def test_interleave_keeps_the_proportions_in_every_stretch():
    a, b = [{"id": f"a{i}"} for i in range(100)], [{"id": f"b{i}"} for i in range(100)]
    rows, taken = interleave([a, b], [3, 1], limit=40)
    assert taken == [30, 10] and len(rows) == 40
    assert "".join(r["id"][0] for r in rows[:12]) == "aaba" * 3  # 3:1 within every 4 rows
    assert [r["id"] for r in rows if r["id"][0] == "b"] == [f"b{i}" for i in range(10)]  # each part in order
    rows, taken = interleave([a[:5], b], [1, 1])
    assert taken == [5, 5]  # stops when a part runs out, so the mix holds


def test_a_mix_tokenizes_each_source_as_its_kind(tmp_path):
    (tmp_path / "text.txt").write_text(CORPUS)
    with open(tmp_path / "sft.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"instruction": f"say {i}", "context": "", "response": f"{i} {i}"}) + "\n")
    config = HealConfig(method="distill", data=f"{tmp_path / 'text.txt'}:2+{tmp_path / 'sft.jsonl'}:1",
                        max_length=32, max_samples=12)
    rows, info = prepare_training_rows(config, tiny_tokenizer())
    assert len(rows) == 12 and [p["rows_used"] for p in info["parts"]] == [8, 4]
    text_rows = [r for r in rows if IGNORE_INDEX not in r["labels"]]
    chat_rows = [r for r in rows if IGNORE_INDEX in r["labels"]]
    assert len(text_rows) == 8 and all(len(r["input_ids"]) == 32 for r in text_rows)  # blocks, loss everywhere
    assert len(chat_rows) == 4 and all(r["labels"][0] == IGNORE_INDEX for r in chat_rows)  # prompt masked
    assert info["parts"][1]["kind"] == "instructions" and info["kind"] == "mix"
    with pytest.raises(LayerpruneError, match="TEST data"):
        prepare_training_rows(HealConfig(method="distill", data="c4+dolly-heldout", max_length=32), tiny_tokenizer())
