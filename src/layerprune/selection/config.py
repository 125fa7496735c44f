"""The settings of choosing layers: pruning, scoring, the calibration text they read, the trade-off curve.

Every command's options are built from these fields, so this module loads no torch: the validators import the
registries and parsers they check against when they run (start-up: `layerprune --help` stays under a second).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from layerprune.common.config_base import StrictConfig, apply_preset, comma_list
from layerprune.errors import LayerpruneError


class QualityTargetMixin:
    """max_loss_increase / max_ppl_ratio: at most one, read as one budgets.QualityTarget."""

    def quality_target(self):
        """The budgets.QualityTarget these settings name, or None."""
        from layerprune.selection.budgets import QualityTarget  # start-up: see the module docstring

        if self.max_loss_increase is None and self.max_ppl_ratio is None:
            return None
        return QualityTarget(max_loss_increase=self.max_loss_increase, max_ppl_ratio=self.max_ppl_ratio)

    def _check_one_quality_target(self) -> None:
        if self.max_loss_increase is not None and self.max_ppl_ratio is not None:
            raise ValueError("give max_loss_increase or max_ppl_ratio, not both")


# The metric that chooses what to remove when none is named, per granularity.
DEFAULT_METRICS = {"block": "block-influence", "attention": "attention-influence", "mlp": "mlp-influence"}


# Named pruning recipes: a preset fills every setting it names unless the setting is given explicitly.
PRUNE_PRESETS: dict[str, dict] = {
    "paper": {"metric": "reverse-order"},  # arXiv 2411.15558: remove the last layers
}


class CalibrationConfig(StrictConfig):
    source: str = Field("c4", description="Calibration text: c4 | wikitext2 | ptb | a .txt/.jsonl file | a hub "
                        "dataset id.")
    field: str = Field("text", description="Text field of a JSONL/hub calibration source.")
    n_samples: int = Field(10, ge=1, description="Calibration samples.")
    seq_len: int = Field(128, ge=2, description="Tokens per calibration sample.")
    seed: int = Field(0, description="Seed of calibration sampling and of the random metric.")


# The documents per task of select_objective tasks when not given.
SELECT_TASKS_DOCS = 32


class PruneConfig(QualityTargetMixin, StrictConfig):
    preset: str | None = Field(None, description="Named recipe whose settings fill what is not given: paper.")
    metric: str | list[str] | None = Field(
        None, description="Importance metric (see `layerprune metrics`), or several with select auto. Default: "
        "block-influence; attention-influence / mlp-influence with granularity attention / mlp."
    )
    select: Literal["metric", "auto", "search"] = Field(
        "metric", description="metric: drop what the metric ranks lowest | auto: compare every metric's drop-set "
        "on held-out calibration text and keep the one with the lowest loss before healing | search: no metric; "
        "remove, one at a time, the layer whose removal raises that loss least (greedy, SLEB-style)."
    )
    select_objective: Literal["loss", "kl", "tasks"] = Field(
        "loss", description="What select auto / search minimize over drop-sets: loss (next-token cross-entropy on "
        "held-out calibration text) | kl (KL from the unpruned model's next-token distributions on that text; "
        "keeps tokens x vocab x 4 bytes) | tasks (the gold answers' loss on ARC-Easy, PIQA and HellaSwag "
        "documents that evaluation does not read).")
    select_tasks_docs: int = Field(SELECT_TASKS_DOCS, ge=1, description="select_objective tasks: documents of each "
                                   "task, from document 1000 on (evaluation reads the first 1000).")
    search_beam: int = Field(1, ge=1, description="select search: drop-sets kept at each step (beam width).")
    search_swap: bool = Field(False, description="select search: afterwards, one pass offering each removed layer "
                              "back in exchange for a kept one, taken when the validation loss falls.")
    granularity: Literal["block", "attention", "mlp"] = Field(
        "block", description="block: remove whole layers | attention / mlp: remove only that branch of the chosen "
        "layers (the model then reloads through layerprune only)."
    )
    drop: list[int] | None = Field(None, description="ORIGINAL layer indices to drop (no scoring).")
    num_layers: int | None = Field(None, ge=1, description="Number of layers to drop.")
    ratio: float | None = Field(None, gt=0, lt=1, description="Fraction of the layers to drop, e.g. 0.25.")
    target_params: str | int | None = Field(
        None, description="Drop the fewest layers that leave at most this many parameters: 100M, 1.5B, 350k."
    )
    target_latency: float | None = Field(
        None, gt=0, lt=1,
        description="Drop the fewest layers that bring the measured latency to this ratio of the original's.",
    )
    latency_mode: Literal["decode", "prefill"] = Field(
        "decode", description="The latency target_latency measures: decode (one token with a KV cache) | prefill.")
    max_loss_increase: float | None = Field(
        None, gt=0, description="Drop the most layers whose drop-set raises the loss on held-out calibration text by "
        "at most this many nats, e.g. 0.5 (may guard target_params / target_latency).")
    max_ppl_ratio: float | None = Field(
        None, gt=1, description="Like max_loss_increase, as a perplexity ratio: 2.0 = at most twice the unpruned "
        "perplexity on held-out calibration text.")
    expert_ratio: float | None = Field(
        None, gt=0, lt=1, description="Mixture-of-experts models: fraction of the experts to remove from every MoE "
        "layer, e.g. 0.25 (as many from every layer: the config holds one expert count). Alone or with a layer budget "
        "(layers go first, then experts are scored on the model that remains).")
    num_experts: int | None = Field(None, ge=1, description="Mixture-of-experts models: number of experts to remove "
                                    "from every MoE layer (like expert_ratio).")
    drop_experts: dict[int, list[int]] | None = Field(
        None, description="Mixture-of-experts models: ORIGINAL expert indices to remove per ORIGINAL layer, e.g. "
        "{0: [1, 6], 1: [0, 7]} (CLI: '0:1,6;1:0,7'); as many in every MoE layer (no scoring).")
    expert_metric: str = Field("reap", description="How experts are scored for expert_ratio / num_experts: reap | "
                               "frequency | soft-count | activation-norm | random (higher = keep; reap measured best at 25% of the "
                               "experts on a trained MoE testbed, docs/results.md).")
    protect_first: int = Field(0, ge=0, description="Never drop the first K layers.")
    protect_last: int = Field(0, ge=0, description="Never drop the last K layers.")
    strategy: Literal["one-shot", "iterative"] = Field(
        "one-shot", description="one-shot | iterative (score, drop `step` layers, heal; repeat: needs schedule).")
    schedule: str | None = Field(
        None, description="Iterative schedule 'step:total' or the paper's '1:step:total', e.g. 1:4:8.")
    metric_params: dict[str, dict] = Field(default_factory=dict, description="Parameters per metric.")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig,
                                           description="Text that data-driven metrics and select auto read.")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data):
        data = apply_preset(data, PRUNE_PRESETS)
        if isinstance(data, dict) and data.get("schedule") is not None and data.get("strategy") is None:
            data = {**data, "strategy": "iterative"}  # a schedule means iterative pruning
        return data

    @field_validator("metric")
    @classmethod
    def _known_metrics(cls, value):
        from layerprune.importance import get_metric  # start-up: see the module docstring

        if value is None:
            return value
        for name in [value] if isinstance(value, str) else value:
            try:
                get_metric(name)
            except LayerpruneError as err:
                raise ValueError(str(err)) from None
        return value

    @field_validator("expert_metric")
    @classmethod
    def _known_expert_metric(cls, value):
        from layerprune.importance.experts.registry import get_expert_metric  # start-up: see the module docstring

        try:
            get_expert_metric(value)
        except LayerpruneError as err:
            raise ValueError(str(err)) from None
        return value

    @field_validator("target_params")
    @classmethod
    def _readable_count(cls, value):
        from layerprune.selection.budgets import parse_param_count  # start-up: see the module docstring

        if value is not None:
            try:
                parse_param_count(value)
            except LayerpruneError as err:
                raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "PruneConfig":
        self._check_granularity()
        self._check_search()
        check_objective(self)
        budgets = (self.num_layers, self.ratio, self.target_params, self.target_latency)
        given = [x is not None for x in (self.drop, *budgets)]
        quality = self.max_loss_increase is not None or self.max_ppl_ratio is not None
        self._check_one_quality_target()
        # a quality target stands alone, or guards a size/speed target (which then sets the count)
        guards = quality and (self.target_params is not None or self.target_latency is not None)
        self._check_experts()
        layer_budgets = sum(given) + (quality and not guards)
        if self.schedule is None and not (layer_budgets == 1 or (layer_budgets == 0 and self.prunes_experts)):
            raise ValueError("give exactly one of drop, num_layers, ratio, target_params or target_latency, or a "
                             "quality target (max_loss_increase or max_ppl_ratio; it may also guard target_params "
                             "or target_latency), and/or an expert budget (expert_ratio or num_experts)")
        if self.schedule is not None and (self.target_params is not None or self.target_latency is not None
                                          or quality):
            raise ValueError("an iterative schedule fixes the layer count; target_params, target_latency, "
                             "max_loss_increase and max_ppl_ratio need strategy one-shot")
        if self.strategy == "iterative" and self.schedule is None:
            raise ValueError("an iterative strategy needs a schedule such as '1:1:8'")
        if self.strategy == "one-shot" and self.schedule is not None:
            raise ValueError("a schedule needs strategy iterative")
        if self.schedule is not None:
            if self.drop is not None:
                raise ValueError("an iterative schedule chooses the layers each round; drop gives them all at once")
            _, total = self.parsed_schedule()
            if self.ratio is not None:
                raise ValueError(f"schedule {self.schedule!r} removes {total} layers; ratio cannot be given too")
            if self.num_layers is not None and self.num_layers != total:  # a study may name both
                raise ValueError(f"schedule {self.schedule!r} removes {total} layers but num_layers is "
                                 f"{self.num_layers}")
        if self.drop is not None:
            duplicates = sorted({i for i in self.drop if self.drop.count(i) > 1})
            if duplicates:
                raise ValueError(f"duplicate layer indices to drop: {duplicates}")
            if min(self.drop, default=0) < 0:
                raise ValueError(f"layer indices must be >= 0, got {min(self.drop)}")
        if self.select == "metric" and isinstance(self.metric, list) and len(self.metric) != 1:
            raise ValueError("several metrics need select auto")
        return self

    @property
    def prunes_experts(self) -> bool:
        return self.expert_ratio is not None or self.num_experts is not None or self.drop_experts is not None

    @property
    def prunes_layers(self) -> bool:
        """Whether layers go (else only experts: expert_ratio / num_experts alone)."""
        return self.drop is not None or self.schedule is not None or self.budget() is not None \
            or self.quality_target() is not None

    def _check_experts(self) -> None:
        if sum(x is not None for x in (self.expert_ratio, self.num_experts, self.drop_experts)) > 1:
            raise ValueError("give one of expert_ratio, num_experts or drop_experts, not several")
        if not self.prunes_experts:
            return
        if self.strategy == "iterative" or self.schedule is not None:
            raise ValueError("expert removal is one-shot: give expert_ratio / num_experts / drop_experts without a "
                             "schedule")
        if self.granularity != "block":
            raise ValueError("expert removal goes with whole-layer removal (granularity block) only")

    def budget(self):
        """The budgets.Budget of this prune (None for an explicit drop list or an iterative schedule)."""
        from layerprune.selection.budgets import Budget  # start-up: see the module docstring

        if self.drop is not None or self.schedule is not None:
            return None
        if self.num_layers is None and self.ratio is None and self.target_params is None and \
                self.target_latency is None:
            return None  # only a quality target (quality_target)
        return Budget(num_layers=self.num_layers, ratio=self.ratio, target_params=self.target_params,
                      target_latency=self.target_latency, latency_mode=self.latency_mode)

    def _check_search(self) -> None:
        if self.select != "search" and (self.search_beam != 1 or self.search_swap):
            raise ValueError("search_beam and search_swap need select search")
        if self.select == "search" and self.drop is not None:
            raise ValueError("select search chooses the layers; drop names them")
        if self.select == "search" and (self.strategy == "iterative" or self.schedule is not None):
            raise ValueError("select search is one-shot: each of its steps already re-judges every layer given "
                             "those removed before")
        if self.search_swap and (self.target_params is not None or self.target_latency is not None):
            raise ValueError("search_swap changes which layers go after target_params / target_latency counted "
                             "them; use num_layers, ratio or a quality target with it")

    def _check_granularity(self) -> None:
        """Fill the default metric of the granularity; refuse what attention-only/MLP-only removal can't do."""
        from layerprune.importance.registry import check_granularity  # start-up: see the module docstring

        if self.select == "search":
            if self.metric is not None:
                raise ValueError("select search ranks drop-sets by validation loss alone; metric is not used "
                                 "(several metrics: select auto)")
            return self._check_whole_layers("select search")
        if self.metric is None:
            self.metric = DEFAULT_METRICS[self.granularity]
        if self.drop is None:
            for name in self.metrics:
                try:
                    check_granularity(name, self.granularity)
                except LayerpruneError as err:
                    raise ValueError(str(err)) from None
        if self.granularity == "block":
            return
        unsupported = {
            "strategy iterative": self.strategy == "iterative" or self.schedule is not None,
            "select auto": self.select == "auto",
            "target_params": self.target_params is not None,
            "target_latency": self.target_latency is not None,
            "max_loss_increase": self.max_loss_increase is not None,
            "max_ppl_ratio": self.max_ppl_ratio is not None,
        }
        for what, given in unsupported.items():
            if given:
                self._check_whole_layers(what)

    def _check_whole_layers(self, what: str) -> None:
        if self.granularity != "block":
            raise ValueError(f"granularity {self.granularity!r} supports one-shot pruning by a metric or a drop "
                             f"list; {what} removes whole layers")

    @property
    def metrics(self) -> list[str]:
        """The metrics that rank layers ([] for select search, which ranks drop-sets by validation loss)."""
        if self.metric is None:
            return []
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


def check_objective(config) -> None:
    """select_objective / select_tasks_docs of a PruneConfig or CurveConfig: each only where it applies."""
    objective = config.select_objective
    if getattr(config, "select", None) == "metric" and objective != "loss":
        raise ValueError(f"select_objective {objective} judges drop-sets, which needs select auto or search; select "
                         "metric takes the metric's own")
    if objective != "tasks" and config.select_tasks_docs != SELECT_TASKS_DOCS:
        raise ValueError("select_tasks_docs needs select_objective tasks")
    if objective != "loss" and config.quality_target() is not None:
        raise ValueError(f"max_loss_increase and max_ppl_ratio bound the validation loss on calibration text; "
                         f"they need select_objective loss, not {objective}")
    if objective == "tasks":
        from layerprune.data.task_answers import max_documents  # start-up: see the module docstring

        if config.select_tasks_docs > max_documents():
            raise ValueError(f"select_tasks_docs is at most {max_documents()} (PIQA's documents after the first 1000 "
                             f"that evaluation reads), got {config.select_tasks_docs}")


SEARCH = "search"  # the greedy drop-set search, a selection of its own next to the metrics


def curve_selections(metric) -> list[str]:
    """Names from 'a,b' or a list: whole-layer metrics and `search`; unknown names are one error."""
    from layerprune.importance import available_metrics, get_metric  # start-up: see the module docstring

    names = comma_list(metric)
    if not names:
        raise LayerpruneError("no selection given")
    whole = [m for m in available_metrics() if "block" in get_metric(m).granularities]
    for name in names:
        if name != SEARCH and name not in whole:
            raise LayerpruneError(f"unknown selection {name!r}; use search or a whole-layer metric: {', '.join(whole)}")
    if len(set(names)) != len(names):
        raise LayerpruneError(f"a selection is named twice: {', '.join(names)}")
    return names


class StabilityConfig(StrictConfig):
    """The calibration-stability study of `layerprune score` (Table 6 of arXiv 2411.15558): every metric
    scored and selected under each (source, n_samples, seed), with the Jaccard overlap of the drop-sets."""

    sources: list[str] = Field(..., min_length=1, description="Calibration sources to compare.")
    n_samples: list[int] = Field(..., min_length=1, description="Calibration sample counts to compare.")
    seeds: int = Field(1, ge=1, description="Calibration seeds per (source, n_samples).")


class ScoreConfig(StrictConfig):
    """`layerprune score` / api.score_model: every layer's score under each metric, and the layers each
    metric would drop."""

    metric: str | list[str] = Field("all", description="Metric name(s), comma separated, or 'all' (every "
                                    "whole-layer metric; see `layerprune metrics`), or 'none' (experts only).")
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig,
                                           description="Text the data-driven metrics read.")
    num_layers: int | None = Field(None, ge=1, description="Layers each metric would drop (default: 25%).")
    ratio: float | None = Field(None, gt=0, lt=1, description="Fraction of the layers each metric would drop.")
    block_size: int | None = Field(None, ge=1, description="Angular distance block size m (default: the number of "
                                   "layers to drop; its table covers every m).")
    streaming: bool = Field(False, description="Read one layer at a time from the checkpoint, for models bigger than "
                            "memory (block-influence, relative-magnitude, angular, magnitude-l1/-l2, the baselines).")
    stability: StabilityConfig | None = Field(None, description="Also run the calibration-stability study.")
    expert_metric: str | list[str] | None = Field(
        None, description="Mixture-of-experts models: also score every expert with these expert metrics (comma "
        "separated, or 'all'; see `layerprune metrics`): expert_scores.json/md; with streaming one layer at a time.")

    @field_validator("expert_metric")
    @classmethod
    def _known_expert_metrics(cls, value):
        from layerprune.importance.experts.registry import parse_expert_metrics  # start-up: see the module docstring

        if value is not None:
            try:
                parse_expert_metrics(value)
            except LayerpruneError as err:
                raise ValueError(str(err)) from None
        return value

    @property
    def expert_metrics(self) -> list[str]:
        from layerprune.importance.experts.registry import parse_expert_metrics  # start-up: see the module docstring

        return [] if self.expert_metric is None else parse_expert_metrics(self.expert_metric)

    @field_validator("metric")
    @classmethod
    def _known_metrics(cls, value):
        from layerprune.selection.scores import parse_metrics  # start-up: see the module docstring

        try:
            parse_metrics(value if isinstance(value, str) else ",".join(value))
        except LayerpruneError as err:
            raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _one_count(self) -> "ScoreConfig":
        if self.num_layers is not None and self.ratio is not None:
            raise ValueError("give num_layers or ratio, not both")
        if self.streaming and self.stability is not None:
            raise ValueError("streaming scores one calibration setting; the stability study needs the loaded model")
        return self

    @property
    def metrics(self) -> list[str]:
        from layerprune.selection.scores import parse_metrics  # start-up: see the module docstring

        return parse_metrics(self.metric if isinstance(self.metric, str) else ",".join(self.metric))

    def n_drop(self, n_layers: int) -> int:
        """How many layers each metric's selection drops: num_layers, ratio, or 25% of the layers."""
        from layerprune.selection.ranking import count_to_drop  # start-up: see the module docstring

        ratio = 0.25 if self.num_layers is None and self.ratio is None else self.ratio
        return count_to_drop(n_layers, num_layers=self.num_layers, ratio=ratio)


class CurveConfig(QualityTargetMixin, StrictConfig):
    """`layerprune curve`: validation perplexity against the number of layers removed (layerprune.selection.curve)."""

    metric: str | list[str] = Field(
        ["block-influence", "angular", "search"], description="Selections to trace, comma separated: whole-layer "
        "metrics (see `layerprune metrics`) and search (the greedy drop-set search by validation loss).")
    max_drop: float = Field(0.5, gt=0, allow_inf_nan=False, description="Most layers removed: a fraction of the "
                            "layers (below 1) or a count.")
    search_beam: int = Field(1, ge=1, description="Drop-sets the search keeps at each step (beam width).")
    select_objective: Literal["loss", "kl", "tasks"] = Field(
        "loss", description="What the curve measures (and the search minimizes), as prune's select_objective: loss "
        "(validation perplexity) | kl (KL from the unpruned model; the curve shows exp(KL)) | tasks (the gold "
        "answers' perplexity on ARC-Easy, PIQA and HellaSwag documents that evaluation does not read).")
    select_tasks_docs: int = Field(SELECT_TASKS_DOCS, ge=1, description="select_objective tasks: documents of each "
                                   "task, from document 1000 on (evaluation reads the first 1000).")
    knee_slope: float = Field(0.1, gt=0, description="The knee is the largest k before the validation loss first "
                              "rises by more than this many nats for one more layer.")
    max_loss_increase: float | None = Field(None, gt=0, description="Report, per selection, the most layers whose "
                                            "validation loss rises by at most this many nats.")
    max_ppl_ratio: float | None = Field(None, gt=1, description="Report, per selection, the most layers whose "
                                        "validation perplexity stays within this ratio of the unpruned one.")
    protect_first: int = Field(0, ge=0, description="Never drop the first K layers.")
    protect_last: int = Field(0, ge=0, description="Never drop the last K layers.")
    calibration: CalibrationConfig = Field(
        default_factory=CalibrationConfig, description="Text the metrics read; the curve is measured on held-out "
        "text drawn from the same source with another seed (as select auto / search do).")

    @field_validator("metric")
    @classmethod
    def _known_selections(cls, value):
        try:
            curve_selections(value)
        except LayerpruneError as err:
            raise ValueError(str(err)) from None
        return value

    @model_validator(mode="after")
    def _one_target(self) -> "CurveConfig":
        self._check_one_quality_target()
        check_objective(self)
        if self.max_drop >= 1 and self.max_drop != int(self.max_drop):
            raise ValueError(f"max_drop is a fraction below 1 or a whole number of layers, got {self.max_drop:.6g}")
        return self

    @property
    def selections(self) -> list[str]:
        return curve_selections(self.metric)
