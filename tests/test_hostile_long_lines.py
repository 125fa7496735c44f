"""Input lines are read with a cap (docs/safety.md): one huge JSONL line or document never reaches the
tokenizer whole, and the rows are those the whole text would give."""

import json

from layerprune.data import instructions
from layerprune.data.instructions import Example, text_pieces, tokenize_example, tokenize_text
from layerprune.finetune.config import HealConfig
from layerprune.finetune.stage import prepare_training_rows
from tiny_models import tiny_tokenizer


class Spy:
    """A tokenizer that records the longest text it was given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, text, **kwargs):
        self.longest = max(self.longest, len(text))
        return self.tokenizer(text, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_huge_instruction_line_reaches_the_tokenizer_cut_to_what_a_row_keeps(tmp_path):
    huge = "word " * 2_000_000  # 10 MB in one field of one line
    (tmp_path / "sft.jsonl").write_text(json.dumps({"instruction": "say it", "context": "", "response": huge}) + "\n"
                                        + json.dumps({"instruction": "say hi", "context": "", "response": "hi"}) + "\n")
    spy = Spy(tiny_tokenizer())
    rows, info = prepare_training_rows(HealConfig(method="lora", data=str(tmp_path / "sft.jsonl"), max_length=64),
                                       spy)
    assert info["examples"] == 2 and max(len(r["input_ids"]) for r in rows) == 64
    assert spy.longest <= 64 * instructions.MAX_CHARS_PER_TOKEN + 1000  # the cut field and the template
    whole = tokenize_example(Example("say it", "", huge[:100_000]), tiny_tokenizer(), template="chat", max_length=64)
    assert whole in rows  # the same row the whole text gives


def test_a_huge_document_is_tokenized_in_pieces_that_split_no_word(monkeypatch):
    monkeypatch.setattr(instructions, "PIECE_CHARS", 1000)
    text = " ".join(f"w{i}" for i in range(3000))
    pieces = list(text_pieces(text, 1000))
    assert "".join(pieces) == text and max(map(len, pieces)) <= 1000
    assert all(piece.endswith(" ") for piece in pieces[:-1])
    spy = Spy(tiny_tokenizer())
    rows = tokenize_text([text], spy, max_length=32)
    assert spy.longest <= 1000
    assert rows == tokenize_text([text], tiny_tokenizer(), max_length=32)  # the tiny tokenizer: one per character
