"""A run, as one YAML file: pydantic models validated before any model loads.

Unknown keys are errors (a typo must not silently fall back to a default), and every error names
the offending key. See examples/*.yaml.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from layerprune.errors import LayerpruneError
from layerprune.finetune.config import HealConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalibrationConfig(_Strict):
    source: str = Field("c4", description="c4 | wikitext2 | ptb | a .txt/.jsonl file | a hub dataset id")
    field: str = "text"
    n_samples: int = Field(10, ge=1)
    seq_len: int = Field(128, ge=2)
    seed: int = 0


class PruneConfig(_Strict):
    metric: str | list[str] | None = Field(
        None, description="One metric, or several with select: auto. Default: block-influence, or "
        "attention-influence / mlp-influence with granularity attention / mlp."
    )
    granularity: Literal["block", "attention", "mlp"] = Field(
        "block", description="block: remove whole layers; attention / mlp: remove only that branch of the chosen "
        "layers (the model then reloads through layerprune only)."
    )
    select: Literal["metric", "auto"] = Field(
        "metric", description="metric: drop what the metric ranks lowest; auto: try every metric's drop-set "
        "and keep the one with the lowest validation loss before healing."
    )
    drop: list[int] | None = Field(None, description="Explicit ORIGINAL indices (no scoring).")
    num_layers: int | None = Field(None, ge=1)
    ratio: float | None = Field(None, gt=0, lt=1)
    target_params: str | int | None = Field(
        None, description="Drop the fewest layers that leave at most this many parameters: 100M, 1.5B, 350k or an int."
    )
    target_latency: float | None = Field(
        None, gt=0, lt=1,
        description="Drop the fewest layers that bring the measured latency to this ratio of the original's.",
    )
    latency_mode: Literal["decode", "prefill"] = Field("decode", description="The latency target_latency measures.")
    protect_first: int = Field(0, ge=0)
    protect_last: int = Field(0, ge=0)
    strategy: Literal["one-shot", "iterative"] = "one-shot"
    schedule: str | None = Field(None, description="Iterative schedule 'step:total' or the paper's '1:step:total'.")
    metric_params: dict[str, dict] = Field(default_factory=dict, description="Per-metric parameters.")

    @field_validator("metric")
    @classmethod
    def _known_metrics(cls, value):
        from layerprune.importance import get_metric

        if value is None:
            return value
        for name in [value] if isinstance(value, str) else value:
            try:
                get_metric(name)
            except LayerpruneError as err:
                raise ValueError(str(err)) from None
        return value

    @field_validator("target_params")
    @classmethod
    def _readable_count(cls, value):
        from layerprune.budgets import parse_param_count

        if value is not None:
            try:
                parse_param_count(value)
            except LayerpruneError as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "PruneConfig":
        self._check_granularity()
        budgets = (self.num_layers, self.ratio, self.target_params, self.target_latency)
        given = [x is not None for x in (self.drop, *budgets)]
        if self.schedule is None and sum(given) != 1:
            raise ValueError("give exactly one of drop, num_layers, ratio, target_params or target_latency")
        if self.schedule is not None and (self.target_params is not None or self.target_latency is not None):
            raise ValueError("an iterative schedule fixes the layer count; target_params and target_latency need "
                             "strategy one-shot")
        if self.strategy == "iterative" and self.schedule is None:
            raise ValueError("an iterative strategy needs a schedule such as '1:1:8'")
        if self.schedule is not None:
            _, total = self.parsed_schedule()
            if self.strategy == "iterative" and self.num_layers is not None and self.num_layers != total:
                raise ValueError(f"schedule {self.schedule!r} removes {total} layers but num_layers is "
                                 f"{self.num_layers}")
        if self.select == "metric" and isinstance(self.metric, list) and len(self.metric) != 1:
            raise ValueError("several metrics need select: auto")
        return self

    def budget(self):
        """The budgets.Budget of this prune (None for an explicit drop list or an iterative schedule)."""
        from layerprune.budgets import Budget

        if self.drop is not None or self.schedule is not None:
            return None
        return Budget(num_layers=self.num_layers, ratio=self.ratio, target_params=self.target_params,
                      target_latency=self.target_latency, latency_mode=self.latency_mode)

    def _check_granularity(self) -> None:
        """Fill the default metric of the granularity; refuse what attention-only/MLP-only removal can't do."""
        from layerprune.importance.registry import check_granularity

        if self.metric is None:
            self.metric = {"block": "block-influence"}.get(self.granularity, f"{self.granularity}-influence")
        if self.drop is None:
            for name in self.metrics:
                try:
                    check_granularity(name, self.granularity)
                except LayerpruneError as err:
                    raise ValueError(str(err)) from None
        if self.granularity == "block":
            return
        unsupported = {
            "strategy: iterative": self.strategy == "iterative" or self.schedule is not None,
            "select: auto": self.select == "auto",
            "target_params": getattr(self, "target_params", None) is not None,
            "target_latency": getattr(self, "target_latency", None) is not None,
        }
        for what, given in unsupported.items():
            if given:
                raise ValueError(f"granularity {self.granularity!r} supports one-shot pruning by a metric or a drop "
                                 f"list; {what} removes whole layers")

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    def parsed_schedule(self) -> tuple[int, int]:
        """(layers per round, total layers) from 'step:total' or the paper's '1:step:total'."""
        parts = (self.schedule or "").split(":")
        if not all(re.fullmatch(r"\d+", p) for p in parts) or len(parts) not in (2, 3):
            raise ValueError(f"schedule {self.schedule!r} must look like 1:1:8 or 2:8")
        step, total = int(parts[-2]), int(parts[-1])
        if step < 1 or total < 1 or total % step:
            raise ValueError(f"schedule {self.schedule!r}: total must be a positive multiple of the step")
        return step, total


class HealStage(HealConfig):
    data: str | None = Field(None, description="dolly | file | hub id; cpt: c4 | a text file (not the wikitext2/ptb test sets).")
    max_samples: int | None = Field(None, ge=1)
    template: Literal["auto", "chat", "alpaca"] = "auto"
    fields: str | None = Field(None, description="Field mapping: instruction=...,context=...,response=...")


class EvalStage(_Strict):
    tasks: str = Field("", description="Task names, 'paper', or paths (see layerprune eval).")
    ppl: str = "wikitext2"
    seq_len: int = Field(128, ge=2)
    ppl_windows: int | None = Field(None, ge=1, description="First N windows only (quick runs).")
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    samples: bool = True
    original: bool = Field(True, description="Also evaluate the unpruned model.")
    before_healing: bool = Field(True, description="Also evaluate the pruned model before healing.")


class BenchStage(_Strict):
    seq_len: int = Field(64, ge=1)
    batch_sizes: list[int] = [1]
    new_tokens: list[int] = [32]
    warmup: int = Field(2, ge=0)
    runs: int = Field(5, ge=1)


class RunConfig(_Strict):
    model: str
    out: str | None = Field(None, description="Run folder (default runs/<config file name>).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "fp32"
    seed: int = 0
    calibration: CalibrationConfig = CalibrationConfig()
    prune: PruneConfig
    heal: list[HealStage] = Field(default_factory=list, description="Healing stages, run in order.")
    eval: EvalStage | None = None
    bench: BenchStage | None = None

    @field_validator("heal", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, dict) else value


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file that must hold a mapping; one LayerpruneError otherwise."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise LayerpruneError(f"config file not found: {path}") from None
    except yaml.YAMLError as err:
        raise LayerpruneError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LayerpruneError(f"{path} must hold a mapping of settings")
    return data


def build_config(config_cls, data: dict, where_prefix: str = ""):
    """Validate settings into a pydantic config; the error names the offending key and the value given."""
    try:
        return config_cls(**data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "config"
        message = first["msg"].removeprefix("Value error, ")
        given = f" (got {first['input']!r})" if first.get("type") != "missing" and not isinstance(
            first.get("input"), dict) else ""
        raise LayerpruneError(f"{where_prefix}{where}: {message}{given}") from None


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
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        if part == "heal" and isinstance(node[part], dict):
            node[part] = [node[part]]
        node = node[part]
    last = parts[-1]
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
