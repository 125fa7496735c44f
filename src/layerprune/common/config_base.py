"""What every stage config shares: strictness, named presets, quality targets, comma lists.

A leaf module: `layerprune.config` and `layerprune.finetune.config` both build on it.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from layerprune.errors import LayerpruneError, shorten


class StrictConfig(BaseModel):
    """A YAML typo is an error, not a silently ignored key; inf and nan are no setting's value (an endless
    budget or a nan rate would fail only after the work began)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def apply_preset(data, presets: dict[str, dict]):
    """Fill every setting a named preset gives unless the setting is given explicitly (None: not given)."""
    if not isinstance(data, dict) or data.get("preset") is None:
        return data
    if data["preset"] not in presets:
        raise ValueError(f"unknown preset {data['preset']!r}; available: {', '.join(presets)}")
    return {**presets[data["preset"]], **{k: v for k, v in data.items() if v is not None}}


def comma_list(value: str | list | None) -> list[str]:
    """'a, b,,c' or a list -> ['a', 'b', 'c'] (empty items dropped; None -> [])."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else value
    return [str(item).strip() for item in items if str(item).strip()]


def build_config(config_cls, data: dict, where_prefix: str = "", key_name=None):
    """Validate settings into a pydantic config; the error names the offending key and the value given.

    key_name(loc) renders the key (the CLI names its option); default: the dotted path."""
    try:
        return config_cls(**data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = first["loc"]
        where = (key_name(loc) if key_name and loc else ".".join(str(part) for part in loc)) or "config"
        message = first["msg"].removeprefix("Value error, ")
        if not loc and key_name:  # a rule across fields: name each field as the caller spells it (CLI options)
            for name in config_cls.model_fields:
                message = re.sub(rf"(?<![\w-]){name}(?![\w-])", key_name((name,)), message)  # not drop-sets
            raise LayerpruneError(f"{where_prefix}{message}") from None
        given = f" (got {shorten(repr(first['input']))})" if first.get("type") != "missing" and not isinstance(
            first.get("input"), dict) else ""
        raise LayerpruneError(f"{where_prefix}{where}: {message}{given}") from None


def as_config(config_cls, config=None, **fields):
    """A stage config from a config object, a dict, or keyword fields (given fields override the object's;
    None means "not given"). One LayerpruneError naming the key on a bad value."""
    if isinstance(config, config_cls) and not fields:
        return config
    data = config.model_dump(exclude_unset=True) if isinstance(config, config_cls) else dict(config or {})
    data.update({k: v for k, v in fields.items() if v is not None})
    return build_config(config_cls, data)


# The one default of each loading setting, for every command, the API and YAML runs.
DEFAULT_DTYPE = "auto"


Dtype = Literal["auto", "bf16", "fp16", "fp32"]
