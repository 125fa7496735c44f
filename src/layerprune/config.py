"""The run: one typed config per stage chained into a YAML run (RunConfig), and reading it.

Each stage's config lives with its stage (selection/config.py: PruneConfig, ScoreConfig, CurveConfig,
CalibrationConfig; finetune/config.py: HealConfig; evaluation/config.py: EvalConfig; benchmark/config.py:
BenchConfig) and is re-exported here, so `layerprune.config` names every setting. These pydantic models
are the single source of settings and defaults: a YAML run's stages ARE these models, the Python API takes
them (or their fields as keyword arguments), and every CLI option is generated from a field
(cli/options.py). Unknown keys are errors (a typo must not silently fall back to a default), every error
names the offending key, and all of it is checked before any model loads.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import Field, field_validator

from layerprune.benchmark.config import BenchConfig
from layerprune.common.config_base import DEFAULT_DTYPE, Dtype, StrictConfig, as_config, build_config
from layerprune.errors import LayerpruneError, shorten
from layerprune.evaluation.config import DEFAULT_PPL_WINDOWS, DEFAULT_TASK_LIMIT, EvalConfig
from layerprune.files.user_files import read_text
from layerprune.finetune.config import HealConfig
from layerprune.selection.config import (
    DEFAULT_METRICS,
    PRUNE_PRESETS,
    SEARCH,
    SELECT_TASKS_DOCS,
    CalibrationConfig,
    CurveConfig,
    PruneConfig,
    ScoreConfig,
    StabilityConfig,
    check_objective,
    curve_selections,
)

__all__ = [  # every stage's settings, re-exported: `layerprune.config` is where users look for them
    "DEFAULT_DTYPE", "DEFAULT_METRICS", "DEFAULT_PPL_WINDOWS", "DEFAULT_TASK_LIMIT", "PRUNE_PRESETS", "SEARCH",
    "SELECT_TASKS_DOCS", "BenchConfig", "CalibrationConfig", "CurveConfig", "Dtype", "EvalConfig", "EvalStage",
    "HealConfig", "PruneConfig", "RunConfig", "ScoreConfig", "StabilityConfig", "apply_sets", "as_config",
    "build_config", "check_objective", "curve_selections", "load_run_config", "read_yaml_mapping", "set_dotted",
]


class EvalStage(EvalConfig):
    """The eval stage of a run: the evaluation settings (the same defaults as `layerprune eval`: one default
    per setting, whatever the door), and which models of the run to evaluate. The paper's full protocol is
    `tasks: paper, limit: 0, ppl_windows: 0` (examples/paper.yaml)."""

    original: bool = Field(True, description="Also evaluate the unpruned model.")
    before_healing: bool = Field(True, description="Also evaluate the pruned model before healing.")


class RunConfig(StrictConfig):
    model: str
    out: str | None = Field(None, description="Run folder (default runs/<config file name>).")
    dtype: Dtype = Field(DEFAULT_DTYPE, description="Weights dtype for scoring, pruning, evaluation and benchmark.")
    seed: int = 0
    trust_remote_code: bool = Field(False, description="Run the Python code a model folder ships (auto_map); "
                                    "only for models you trust. Off: such models are refused.")
    prune: PruneConfig
    heal: list[HealConfig] = Field(default_factory=list, description="Healing stages, run in order.")
    eval: EvalStage | None = None
    bench: BenchConfig | None = None
    curve: CurveConfig | None = Field(None, description="Trade-off curve of the unpruned model (curve/): validation "
                                      "perplexity against layers removed, per metric and for the search.")

    @field_validator("heal", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, dict) else value


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file that must hold a mapping; one LayerpruneError otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(read_text(path, "config file"))  # missing, a folder, not UTF-8: one error
    except yaml.YAMLError as err:
        raise LayerpruneError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LayerpruneError(f"{path} must hold a mapping of settings")
    return data


def set_dotted(data: dict, dotted: str, value) -> None:
    """Set `a.b.0.c` in nested dicts/lists; a missing dict level is created."""
    parts = dotted.split(".")
    node = data
    for i, part in enumerate(parts[:-1]):
        nxt = parts[i + 1]
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise LayerpruneError(f"key {dotted!r}: there is no item {part} in {'.'.join(parts[:i]) or 'config'}")
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise LayerpruneError(f"key {shorten(dotted)!r}: {'.'.join(parts[:i])} is a value "
                                  f"({shorten(repr(node), 60)}), not a section with keys")
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        if part == "heal" and isinstance(node[part], dict):
            node[part] = [node[part]]
        node = node[part]
    last = parts[-1]
    if not isinstance(node, (dict, list)):  # model.a=1: model is a string, not a section
        raise LayerpruneError(f"key {shorten(dotted)!r}: {'.'.join(parts[:-1])} is a value "
                              f"({shorten(repr(node), 60)}), not a section with keys")
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise LayerpruneError(f"key {dotted!r}: there is no item {last}")
        node[int(last)] = value
    else:
        node[last] = value


def apply_sets(data: dict, sets: list[str]) -> None:
    """Command-line overrides `key.path=value` (value read as YAML: 1e-4, [a, b], null)."""
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise LayerpruneError(f"--set {item!r}: write it as key=value, e.g. heal.0.learning_rate=1e-4")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            value = text
        set_dotted(data, key.strip(), value)


def load_run_config(path: str | Path, overrides: dict | None = None, sets: list[str] | None = None) -> RunConfig:
    """Read and validate a run YAML; one LayerpruneError naming the key on any problem."""
    path = Path(path)
    data = read_yaml_mapping(path)
    data.update(overrides or {})
    apply_sets(data, sets or [])
    data.setdefault("out", str(Path("runs") / path.stem))
    return build_config(RunConfig, data, where_prefix=f"{path}: ")
