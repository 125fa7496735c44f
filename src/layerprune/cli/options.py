"""Options generated from the stage configs, and readers for option values that several commands share.

A command option that sets a config field is made by `config_option`: its default is None ("not
given") and its help shows the config's own default, so the CLI can never disagree with the API or a
YAML run. `config_from_options` builds the config from what was given.
"""

from __future__ import annotations

import re
import typing
from typing import Callable

import typer
from rich.markup import escape

from layerprune.common.config_base import build_config
from layerprune.config import read_yaml_mapping
from layerprune.errors import LayerpruneError

# Calibration settings are nested in the prune config; on the command line they read as --calib etc.
CALIBRATION_OPTIONS = {"source": "calib", "field": "calib_field", "n_samples": "n_samples", "seq_len": "seq_len",
                       "seed": "seed"}


def option_flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_flag(annotation) -> bool:
    return annotation is bool or bool in typing.get_args(annotation)


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    return "none" if value is None or value == "" else str(value)


def config_option(config_cls, name: str, *flags: str, option: str | None = None, help: str | None = None):
    """A typer option for field `name` of `config_cls`: default None, help = the field's description and
    default. `option` names the command parameter when it differs from the field (e.g. calib)."""
    field = config_cls.model_fields[name]
    flag = option_flag(option or name)
    decls = flags or ((f"{flag}/--no-{flag[2:]}",) if _is_flag(field.annotation) else (flag,))
    default = field.get_default(call_default_factory=True)
    shown = escape(f"[default: {_shown(default)}]")  # rich would read the brackets as markup
    return typer.Option(None, *decls, help=f"{help or field.description or ''} {shown}", show_default=False)


def config_from_options(config_cls, values: dict, *, yaml_path: str | None = None,
                        convert: dict[str, Callable] | None = None, nested: dict[str, dict[str, str]] | None = None):
    """The config of the options that were given (over a YAML file's settings, if any); one error naming
    the option on a bad value. nested: {field: {sub-field: option}} for nested configs (calibration)."""
    convert = convert or {}
    data = read_yaml_mapping(yaml_path) if yaml_path else {}
    names = {}  # config key path -> option, for error messages
    for name in config_cls.model_fields:
        if name in (nested or {}):
            sub = dict(data.get(name) or {})
            for key, option in nested[name].items():
                names[(name, key)] = option
                if values.get(option) is not None:
                    sub[key] = values[option]
            if sub:
                data[name] = sub
        elif values.get(name) is not None:
            data[name] = convert[name](values[name]) if name in convert else values[name]
    return build_config(config_cls, data, key_name=lambda loc: option_flag(names.get(tuple(loc[:2]), str(loc[0]))))


def parse_int_list(text: str, option: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16]; anything else is a user error naming the option."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"-?\d+", p) for p in parts):
        raise LayerpruneError(f"could not read {option} from {text!r}; write whole numbers like 1,4,16")
    return [int(p) for p in parts]


MAX_RANGE = 100_000  # no model has this many layers; a typo must not allocate a huge list


def parse_indices(text: str) -> list[int]:
    """'3,5,10-12' -> [3, 5, 10, 11, 12] (ranges inclusive)."""
    indices: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        if match:
            start, end = int(match[1]), int(match[2])
            if end < start:
                raise LayerpruneError(f"layer range {part!r} runs backwards; write it low-high, e.g. {end}-{start}")
            if end - start >= MAX_RANGE:
                raise LayerpruneError(f"layer range {part!r} spans more than {MAX_RANGE} layers")
            indices.extend(range(start, end + 1))
        elif re.fullmatch(r"-?\d+", part):
            indices.append(int(part))
        else:
            raise LayerpruneError(f"could not read layer indices from {text!r}; write them like 3,5,10-12")
    if not indices:
        raise LayerpruneError("no layer indices given")
    return indices


def parse_expert_indices(text: str) -> dict[int, list[int]]:
    """'0:1,6;3:0-2' -> {0: [1, 6], 3: [0, 1, 2]}: ORIGINAL layer, colon, its ORIGINAL expert indices; layers
    separated by ';'."""
    drop: dict[int, list[int]] = {}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        layer, colon, experts = part.partition(":")
        if not colon or not re.fullmatch(r"\d+", layer.strip()):
            raise LayerpruneError(f"could not read experts from {text!r}; write them like '0:1,6;1:0,7' (layer: experts)")
        if int(layer) in drop:
            raise LayerpruneError(f"layer {int(layer)} is given twice in {text!r}")
        try:
            drop[int(layer)] = parse_indices(experts)
        except LayerpruneError as err:
            raise LayerpruneError(f"layer {int(layer)}: {str(err).replace('layer ', 'expert ')}") from None
    if not drop:
        raise LayerpruneError("no experts given")
    return drop
