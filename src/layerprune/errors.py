"""The one exception type for mistakes a user can make.

The CLI prints its message on one line and exits non-zero; library callers can catch it.
"""


class LayerpruneError(Exception):
    """Bad input or an unsupported situation, explained in the message."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): library errors can
    run to pages, and the CLI prints one line."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def shorten(text: str, limit: int = 300) -> str:
    """Echoed input cut to `limit` characters: a value in an error (a YAML anchor bomb, a huge list) must not
    turn one error line into megabytes."""
    text = str(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit:,} more characters)"
