"""The one exception type for mistakes a user can make.

The CLI prints its message on one line and exits non-zero; library callers can catch it.
"""


class LayerpruneError(Exception):
    """Bad input or an unsupported situation, explained in the message."""
