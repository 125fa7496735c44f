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
