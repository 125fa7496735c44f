"""The one rule for the token id that fills padding."""

from __future__ import annotations


def pad_token_id(source) -> int:
    """The pad id of a tokenizer or a (generation) config (or None): its pad, else its (first) EOS, else 0.

    Padding is masked out or comes after the end, so any real token serves when none is declared.
    """
    for value in (getattr(source, "pad_token_id", None), getattr(source, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


IGNORE_INDEX = -100  # label of tokens that carry no loss (prompt, padding)
