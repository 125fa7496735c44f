"""Reading a model folder's transformers config: one place, one error; and whether a folder's own code may run."""

from __future__ import annotations

import contextlib
import contextvars
import os
from typing import Iterator

from layerprune.errors import LayerpruneError, first_line
from layerprune.models.config_sanity import check_config_sanity

# Whether models loaded in this context may run the Python code their folder ships (default: never), and
# whether their tokenizer is loaded: what the CLI's --trust-remote-code / --no-tokenizer set.
_TRUST_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("layerprune_trust_remote_code",
                                                                           default=False)
_LOAD_TOKENIZER: contextvars.ContextVar[bool] = contextvars.ContextVar("layerprune_load_tokenizer", default=True)

REMOTE_CODE_HINT = (
    "layerprune does not run it unless asked: pass --trust-remote-code (a run YAML: trust_remote_code: true; "
    "Python: trust_remote_code=True) only for a model whose code you trust"
)


@contextlib.contextmanager
def loading_options(*, trust_remote_code: bool | None = None, tokenizer: bool | None = None) -> Iterator[None]:
    """Defaults for every model loaded inside the block, by any layerprune function (None: unchanged).

    trust_remote_code: run the Python code a model folder ships (config/tokenizer `auto_map`); off by
    default, when such a model is refused with one error. tokenizer False: load no tokenizer (the model
    is saved weights-only). The CLI sets them from --trust-remote-code / --no-tokenizer; a YAML run from
    its top-level `trust_remote_code`.
    """
    tokens = []
    if trust_remote_code is not None:
        tokens.append((_TRUST_REMOTE_CODE, _TRUST_REMOTE_CODE.set(bool(trust_remote_code))))
    if tokenizer is not None:
        tokens.append((_LOAD_TOKENIZER, _LOAD_TOKENIZER.set(bool(tokenizer))))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def loads_tokenizer(explicit: bool | None = None) -> bool:
    """`explicit` when given, else the setting of `loading_options` (default True)."""
    return _LOAD_TOKENIZER.get() if explicit is None else bool(explicit)


def trusts_remote_code(explicit: bool | None = None) -> bool:
    """`explicit` when given, else the setting of `loading_options` (default False). Never None: transformers
    would then ask on the terminal whether to run the code."""
    return _TRUST_REMOTE_CODE.get() if explicit is None else bool(explicit)


def remote_code_refused(err: BaseException) -> bool:
    """Whether a transformers error is its refusal to run a folder's own code (trust_remote_code=False)."""
    return isinstance(err, ValueError) and "trust_remote_code" in str(err)


def remote_code_error(what: str) -> LayerpruneError:
    return LayerpruneError(f"{what} ships its own Python code (auto_map) to load it; {REMOTE_CODE_HINT}")


def read_model_config(folder: str | os.PathLike, *, trust_remote_code: bool | None = None):
    """The transformers config of a model folder; one LayerpruneError when it can't be read."""
    from transformers import AutoConfig

    check_config_sanity(folder)  # before AutoConfig: some config classes already build per-layer lists
    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trusts_remote_code(trust_remote_code))
    except (OSError, ValueError, KeyError) as err:
        if remote_code_refused(err):
            raise remote_code_error(str(folder)) from err
        raise LayerpruneError(f"could not read the model config of {folder}: {first_line(err)}") from err
