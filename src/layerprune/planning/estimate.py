"""Time estimates before long work, from a short timed probe of the model on this machine.

The probe times one batched forward (seconds per token) and one single-token forward (what a generated
token costs) of the loaded model, in the dtype it will compute in. Every stage's work is then counted in
tokens through the model ("forward tokens"): calibration text per metric pass, validation text per drop-set
a search or select auto tries, training tokens x a backward factor per healing method, perplexity windows
and task documents per evaluation. Counts are approximate on purpose (a factor of 2 is the promise); the
real time of every stage is printed next to its estimate when it ends, and kept in run.json.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

from layerprune.common.config_base import comma_list
from layerprune.common.units import format_seconds
from layerprune.evaluation.generation import DEFAULT_PROMPTS
from layerprune.finetune.local import DEFAULT_LOCAL_ROWS
from layerprune.finetune.teacher_first import examples_answered
from layerprune.hardware.speed import GENERATED_TOKEN_COST, Speed
from layerprune.importance import get_metric
from layerprune.models.anatomy import count_parameters, get_anatomy

# Forward + backward (+ optimizer) over a forward, per healing method: full weights backpropagate through
# every layer and update every weight; LoRA skips the weight gradients; partial backpropagates only
# through its last layers (measured on SmolLM2, 2 CPU cores: distill 3.9 s per step of 1,024 tokens
# against 1.2 s forward).
TRAIN_FACTOR = {"partial": 1.4, "lora": 2.4, "qlora": 3.5}
DEFAULT_TRAIN_FACTOR = 3.2
# A drop-set's validation loss resumes from cached hidden states where it can (DropSetLosses): on average
# about this fraction of a full forward.
DROP_SET_FRACTION = 0.6
# lm-eval documents: subtasks and documents of each bundled task, and forward tokens per document of the
# shared-prefix scorer (context once + every continuation; measured on SmolLM2's tokenizer: 2,580 requests
# of 653 documents ran as ~81k tokens).
TASK_SHAPES = {
    "piqa": (1, 1838), "hellaswag": (1, 10042), "openbookqa": (1, 500), "arc_easy": (1, 2376),
    "arc_challenge": (1, 1172), "mmlu": (57, 14042), "cmmlu": (67, 11582), "winogrande": (1, 1267),
}
TOKENS_PER_DOCUMENT = 130
# Tasks whose documents are shorter than the paper mix's (MMLU/CMMLU questions): effective forward tokens per
# document, measured 2026-12-07 on SmolLM2 in fp32 (2 cores, AVX512-BF16): ARC-e, PIQA and HellaSwag, 1,000
# documents each, scored in 306 s at a timed 2.05 ms per forward token (130 per document had estimated 14 min
# for a 6-minute evaluation).
TASK_TOKENS = {"arc_easy": 50, "piqa": 50, "hellaswag": 50}
# Instruction following (evaluation/instruction_following.py): each held-out prompt is one teacher-forced row
# of ~180 tokens through the model and the reference (the KL), and each greedy token costs ~6 batched
# forward tokens (HF generate at batch 32 with a KV cache). Measured on SmolLM2 in bf16, 2 CPU cores: 100
# prompts x 48 tokens took 65 s against the reference's cached responses, 101 s when the reference first
# had to generate its own.
FOLLOW_ROW_TOKENS = 180
WIKITEXT2_WINDOWS_128 = 2382  # the whole WikiText-2 test text in 128-token windows (SmolLM2's tokenizer)


def work_fraction(model, kept: int) -> float:
    """Per-token cost of the model with `kept` of its layers, over the whole model's: layers scale, the
    head (vocabulary x hidden) stays."""
    params = count_parameters(model)
    n = get_anatomy(model).num_layers
    hidden = int(getattr(model.config, "hidden_size", 0) or 0)
    head = hidden * int(getattr(model.config, "vocab_size", 0) or 0)
    layers = max(params["non_embedding"], 1)
    return (layers * kept / max(n, 1) + head) / (layers + head)


# ------------------------------------------------------------------------------------------ per stage
def score_seconds(metrics: list[str], n_layers: int, tokens: int, speed: Speed) -> float:
    """Every requested metric's passes over the calibration text (a group's metrics share one pass)."""
    passes, groups = 0.0, set()
    for name in metrics:
        spec = get_metric(name)
        if not spec.needs_calibration or (spec.group is not None and spec.group in groups):
            continue
        groups.add(spec.group)
        passes += spec.forward_passes(n_layers) if spec.forward_passes else 1.0
    return passes * tokens * speed.forward


def search_evaluations(allowed: int, k: int, beam: int = 1, swap: bool = False) -> float:
    """Drop-sets a greedy (beam) search tries to reach k removed layers (each step tries every extension)."""
    tried = sum(max(allowed - s, 0) for s in range(k)) * beam
    return tried + (k * max(allowed - k, 0) if swap else 0)


def drop_set_seconds(evaluations: float, tokens: int, speed: Speed) -> float:
    """The intact pass plus `evaluations` drop-sets' validation losses."""
    return (1 + evaluations * DROP_SET_FRACTION) * tokens * speed.forward


def heal_seconds(config, speed: Speed, *, student_fraction: float, rows: int | None = None) -> float | None:
    """Training steps x tokens per step x the method's backward factor, plus the teacher's top-k pass;
    at most the time budget. None when the step count depends on data not read yet (epochs)."""
    accumulation = max(1, math.ceil((config.effective_batch_size or config.batch_size) / config.batch_size))
    rows_per_step = config.batch_size * accumulation
    if config.method in ("replace", "block-local"):  # procedures: a teacher pass and a student pass per row

        n_rows = config.max_samples or DEFAULT_LOCAL_ROWS
        return n_rows * config.max_length * speed.forward * (1 + student_fraction) * 1.5
    if config.max_steps > 0:
        steps = config.max_steps
    elif rows is not None:
        steps = math.ceil(config.epochs * rows / rows_per_step)
    else:
        return None
    tokens = steps * rows_per_step * config.max_length
    factor = TRAIN_FACTOR.get(config.method, DEFAULT_TRAIN_FACTOR)
    seconds = tokens * speed.forward * student_fraction * factor
    if config.method == "distill" and config.distill_top_k is not None:
        seconds += tokens * speed.forward  # the unpruned teacher, once per row
    if config.responses == "teacher":  # the teacher answering the prompts first

        seconds += (examples_answered(config) or 0) * config.response_tokens * GENERATED_TOKEN_COST * speed.forward
    if config.max_minutes is not None:
        seconds = min(seconds, config.max_minutes * 60)
    return seconds


def eval_seconds(config, speed: Speed, *, reference: Speed | None = None, reference_cached: bool = False
                 ) -> float | None:
    """Perplexity windows + task documents + generation samples + instruction following of one evaluation.
    reference: the speed of the model instruction following compares with (None: the model's own, when it
    is not known before loading); reference_cached: its greedy responses are on disk already."""
    seconds = 0.0
    for text in [t for t in comma_list(config.ppl) if t != "none"]:
        windows = config.ppl_windows or WIKITEXT2_WINDOWS_128 * 128 // config.seq_len
        seconds += windows * config.seq_len * speed.forward
    tokens = task_tokens(config.tasks, config.limit)
    if tokens is None:
        return None
    seconds += tokens * speed.forward
    if config.samples:
        seconds += len(DEFAULT_PROMPTS) * config.max_new_tokens * speed.decode
    if config.follow:
        seconds += follow_seconds(config.follow, config.follow_new_tokens, speed, reference or speed,
                                  reference_cached=reference_cached)
    return seconds


def follow_seconds(prompts: int, new_tokens: int, speed: Speed, reference: Speed, *, reference_cached: bool
                   ) -> float:
    """Instruction following: the KL rows through both models, the model's greedy responses, and the
    reference's unless they are cached."""
    kl = prompts * FOLLOW_ROW_TOKENS * (speed.forward + reference.forward)
    generating = [speed] if reference_cached else [speed, reference]
    return kl + sum(prompts * new_tokens * GENERATED_TOKEN_COST * s.forward for s in generating)


def task_tokens(tasks: str, limit: int | None) -> int | None:
    """Forward tokens the scorer runs for a task list ('paper', names, ''), or None for files whose size is
    unknown here."""
    names = [t for t in comma_list(tasks) if t != "none"]
    if names == ["paper"]:
        names = list(TASK_SHAPES)
    total = 0
    for name in names:
        if name not in TASK_SHAPES:
            return None
        subtasks, documents = TASK_SHAPES[name]
        scored = documents if not limit else min(documents, limit * subtasks)
        total += scored * TASK_TOKENS.get(name, TOKENS_PER_DOCUMENT)
    return total


def bench_seconds(config, speed: Speed) -> float:
    """Timed and warm-up generations of both models (prompt + new tokens each)."""
    runs = config.warmup + config.runs
    per_run = sum(b * config.prompt_tokens * speed.forward + n * speed.decode
                  for b in config.batch_sizes for n in config.new_tokens)
    return runs * per_run + 5.0  # + MACs and memory measurements


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class StagePlan:
    name: str
    what: str
    estimate: float | None  # seconds; None: not known before it starts
    seconds: float | None = None  # how long it took
    skipped: bool = False


@dataclass
class Plan:
    """The stages a command will run with their estimates; `timed(name)` records how long each took."""

    title: str
    stages: list[StagePlan] = field(default_factory=list)

    def add(self, name: str, what: str, estimate: float | None, skipped: bool = False) -> None:
        self.stages.append(StagePlan(name, what, 0.0 if skipped else estimate, skipped=skipped))

    @property
    def total(self) -> float | None:
        known = [s.estimate for s in self.stages if s.estimate is not None]
        return sum(known) if known else None

    def record(self, name: str, seconds: float) -> None:
        for stage in self.stages:
            if stage.name == name:
                stage.seconds = (stage.seconds or 0.0) + seconds
                return
        self.stages.append(StagePlan(name, "", None, seconds))

    def timed(self, name: str):
        """Context manager: time the block as stage `name`."""

        @contextlib.contextmanager
        def timing():
            start = time.perf_counter()
            try:
                yield
            finally:
                self.record(name, time.perf_counter() - start)

        return timing()

    def lines(self, with_actual: bool = False) -> list[str]:
        head = f"{self.title}: estimated {format_seconds(self.total)}" if not with_actual else \
            f"{self.title}: estimated {format_seconds(self.total)}, took {format_seconds(self._actual())}"
        rows = [head]
        for s in self.stages:
            left = "done before (skipped)" if s.skipped else format_seconds(s.estimate)
            took = f"  took {format_seconds(s.seconds)}" if with_actual and s.seconds is not None else ""
            rows.append(f"  {s.name:<14} {left:>10}{took}  {s.what}")
        return rows

    def pace(self) -> float | None:
        """Measured time over estimated time of the stages that ran so far (None before any)."""
        ran = [s for s in self.stages if s.seconds is not None and s.estimate and not s.skipped]
        return sum(s.seconds for s in ran) / sum(s.estimate for s in ran) if ran else None

    def remaining(self) -> float | None:
        """The estimate of the stages still to run, scaled by the pace measured so far."""
        left = [s.estimate for s in self.stages if s.seconds is None and not s.skipped and s.estimate is not None]
        pace = self.pace()
        return sum(left) * (pace if pace is not None else 1.0) if left else None

    def progress_line(self, name: str) -> str:
        """After stage `name`: what it took against its estimate, and the time left at the pace measured so far."""
        stage = next((s for s in self.stages if s.name == name), None)
        took = f"{name} took {format_seconds(stage.seconds if stage else None)}"
        if stage is not None and stage.estimate is not None:
            took += f" (estimated {format_seconds(stage.estimate)})"
        left, pace = self.remaining(), self.pace()
        if left is None:
            return took
        return f"{took}; left: ~{format_seconds(left)}" + (f" at {pace:.2g}x the estimated pace" if pace else "")

    def _actual(self) -> float | None:
        times = [s.seconds for s in self.stages if s.seconds is not None]
        return sum(times) if times else None

    def to_json(self) -> list[dict]:
        return [{"stage": s.name, "what": s.what, "estimated_s": _round(s.estimate), "seconds": _round(s.seconds),
                 "skipped": s.skipped} for s in self.stages]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
