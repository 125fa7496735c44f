"""eval.json -> markdown, and two evaluations side by side with deltas."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from layerprune.data.task_data import BUNDLED_TASKS
from layerprune.errors import LayerpruneError
from layerprune.files.outputs import read_json


def plus_minus(value: float | None, stderr: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4f} ± {stderr:.4f}" if stderr is not None else f"{value:.4f}"


def task_title(name: str) -> str:
    return BUNDLED_TASKS[name].title if name in BUNDLED_TASKS else name


def _model_line(model: dict) -> str:
    dropped = ",".join(map(str, model.get("dropped_layers") or [])) or "none"
    quant = model.get("quantization")
    quant = f", linear layers {quant['load_in']} ({quant['quant_type']}, bitsandbytes)" if quant else ""
    return (f"{model['architecture']}, {model['layers']} layers (original {model['original_layers']}; "
            f"dropped {dropped}), {model['parameters']:,} parameters, {model['dtype']}{quant}")


def ppl_protocol(result: dict) -> str:
    windows = f"{result['seq_len']}-token " + (
        "non-overlapping windows" if result["stride"] is None else f"windows, stride {result['stride']}"
    )
    bos = result["bos_used"] + (" (auto)" if result["bos"] == "auto" else "")
    return f"{windows}, BOS {bos}" + (f", first {result['max_windows']} windows" if result.get("max_windows") else "")


def follow_markdown(follow: dict) -> list[str]:
    """The instruction-following section of eval.md."""
    proto = follow["protocol"]
    lines = [f"## Instruction following ({proto['prompts']} held-out Dolly prompts, {proto['template']} template)", "",
             f"Against {follow['reference']}: response KL **{follow['kl']:.4f}** nats/token over {follow['tokens']:,} "
             f"tokens; greedy responses ({proto['new_tokens']} tokens at most): ROUGE-L **{follow['rouge_l']:.3f}**, "
             f"identical {follow['identical']:.0%}"
             + (f", common prefix {follow['prefix_tokens']:.1f} tokens" if follow.get("prefix_tokens") is not None
                else "") + ".", ""]
    for example in follow.get("examples", [])[:3]:
        lines += [f"- {example['prompt'][:80]!r}: model {example['model'][:120]!r}; reference "
                  f"{example['reference'][:120]!r}"]
    return lines + ([""] if follow.get("examples") else [])


def eval_markdown(record: dict) -> str:
    lines = [f"# Evaluation: {record['model']['ref']}", "", _model_line(record["model"]), ""]
    if record.get("average"):
        proto = record["protocol"]["tasks"]
        limit = f", first {proto['limit']} documents per (sub)task" if proto.get("limit") else ""
        lines += [f"## Zero-shot accuracy ({proto['harness']}, {proto['num_fewshot']}-shot{limit})", "",
                  "| task | acc | acc_norm | n |", "|---|---|---|---|"]
        for name, s in record["tasks"].items():
            if "acc" not in s:
                continue  # HumanEval has its own section
            lines.append(f"| {task_title(name)} | {plus_minus(s['acc'], s['acc_stderr'])} | "
                         f"{plus_minus(s['acc_norm'], s['acc_norm_stderr'])} | {s['n']} |")
        avg = record["average"]
        value = f"{avg['value']:.4f}" if avg["value"] is not None else "-"
        lines += [f"| **Avg Acc** ({avg['metric']}, {avg['tasks']} tasks) | {value} | | |", ""]
        categories = {n: s["categories_acc"] for n, s in record["tasks"].items() if s.get("categories_acc")}
        for name, cats in categories.items():
            lines.append(f"{task_title(name)} by category (acc): " + ", ".join(
                f"{c} {v:.4f}" for c, v in cats.items() if v is not None))
        if categories:
            lines.append("")
    if "humaneval" in record.get("tasks", {}):
        he, proto = record["tasks"]["humaneval"], record["protocol"]["humaneval"]
        limit = f", first {proto['limit']} problems" if proto.get("limit") else ""
        lines += [f"## HumanEval (greedy, up to {proto['max_new_tokens']} new tokens{limit}; "
                  f"{proto['execution']['timeout_s']:g} s per program)", "",
                  f"pass@1 **{he['pass@1']:.4f}**: {he['passed']} of {he['n']} problems passed, "
                  f"{he['timed_out']} timed out (completions and results: humaneval.jsonl).", ""]
    if record.get("perplexity"):
        lines += ["## Perplexity", "", "| text | ppl | scored tokens | windows | protocol |", "|---|---|---|---|---|"]
        for name, r in record["perplexity"].items():
            lines.append(f"| {name} | {r['ppl']:.4g} | {r['tokens']:,} | {r['windows']:,} | {ppl_protocol(r)} |")
        lines.append("")
    if record.get("instruction_following"):
        lines += follow_markdown(record["instruction_following"])
    walls = record.get("wall_time_s", {})
    if walls:
        lines += ["Wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in walls.items()), ""]
    lines += ["Files: eval.json (everything above + protocol, data sha256, package versions), "
              "lm_eval_results.json (every subtask), samples.json (greedy generations)"
              + (", humaneval.jsonl (completions)" if "humaneval" in record.get("tasks", {}) else "") + ".", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------ comparison


@dataclass(frozen=True)
class CompareRow:
    label: str
    a: float | None
    b: float | None
    lower_is_better: bool = False

    @property
    def delta(self) -> float | None:
        return None if self.a is None or self.b is None else self.b - self.a


def load_eval(folder: str | Path) -> dict:
    """An evaluation folder's eval.json, or the given JSON file itself."""
    path = Path(folder)
    path = path / "eval.json" if path.is_dir() else path
    record = read_json(path)
    if not isinstance(record, dict) or any(not isinstance(record.get(key, {}), dict)
                                           for key in ("model", "tasks", "perplexity")):
        raise LayerpruneError(f"{path} is not an evaluation written by layerprune eval (no tasks/perplexity mapping)")
    return record


def check_comparable(a: dict, b: dict, name_a: str, name_b: str) -> None:
    """Refuse two evaluations with nothing in common: their averages would be of different tasks."""
    tasks = [set(r.get("tasks", {})) for r in (a, b)]
    ppl = [set(r.get("perplexity", {})) for r in (a, b)]
    if not (tasks[0] & tasks[1]) and not (ppl[0] & ppl[1]):
        listed = [", ".join(sorted(t | p))[:200] or "nothing" for t, p in zip(tasks, ppl)]
        raise LayerpruneError(f"{name_a} and {name_b} have no task or perplexity set in common ({name_a}: "
                              f"{listed[0]}; {name_b}: {listed[1]}), so there is nothing to compare")


def compare_rows(a: dict, b: dict) -> list[CompareRow]:
    rows: list[CompareRow] = []
    tasks = list(dict.fromkeys([*a.get("tasks", {}), *b.get("tasks", {})]))
    for metric in ("acc", "acc_norm"):
        for name in tasks:
            va, vb = (r.get("tasks", {}).get(name, {}).get(metric) for r in (a, b))
            if va is not None or vb is not None:
                rows.append(CompareRow(f"{task_title(name)} {metric}", va, vb))
    va, vb = (r.get("tasks", {}).get("humaneval", {}).get("pass@1") for r in (a, b))
    if va is not None or vb is not None:
        rows.append(CompareRow("HumanEval pass@1", va, vb))
    if a.get("average") or b.get("average"):
        metric = (a.get("average") or b.get("average"))["metric"]
        rows.append(CompareRow(f"Avg Acc ({metric})", (a.get("average") or {}).get("value"),
                               (b.get("average") or {}).get("value")))
    for name in dict.fromkeys([*a.get("perplexity", {}), *b.get("perplexity", {})]):
        va, vb = (r.get("perplexity", {}).get(name, {}).get("ppl") for r in (a, b))
        rows.append(CompareRow(f"{name} ppl", va, vb, lower_is_better=True))
    return rows


def protocol_differences(a: dict, b: dict) -> list[str]:
    """Settings that make two results not directly comparable."""
    notes = []
    pa, pb = a.get("protocol", {}), b.get("protocol", {})
    for key in ("data_source", "avg_metric"):
        if pa.get(key) != pb.get(key):
            notes.append(f"{key}: {pa.get(key)} vs {pb.get(key)}")
    ta, tb = pa.get("tasks") or {}, pb.get("tasks") or {}
    if ta and tb and ta.get("limit") != tb.get("limit"):
        notes.append(f"task limit: {ta.get('limit')} vs {tb.get('limit')}")
    only = [sorted(set(x.get("tasks", {})) - set(y.get("tasks", {}))) for x, y in ((a, b), (b, a))]
    if a.get("average") and b.get("average") and (only[0] or only[1]):
        notes.append(f"Avg Acc averages other tasks (only in A: {', '.join(only[0]) or '-'}; only in B: "
                     f"{', '.join(only[1]) or '-'})")
    ha, hb = pa.get("humaneval") or {}, pb.get("humaneval") or {}
    for key in ("limit", "max_new_tokens"):
        if ha and hb and ha.get(key) != hb.get(key):
            notes.append(f"HumanEval {key}: {ha.get(key)} vs {hb.get(key)}")
    for name in set(a.get("perplexity", {})) & set(b.get("perplexity", {})):
        ra, rb = a["perplexity"][name], b["perplexity"][name]
        if ppl_protocol(ra) != ppl_protocol(rb):
            notes.append(f"{name}: {ppl_protocol(ra)} vs {ppl_protocol(rb)}")
    for path in set(a.get("data", {})) & set(b.get("data", {})):
        if a["data"][path] != b["data"][path]:
            notes.append(f"{path}: different data (sha256)")
    return notes


def _fmt(value: float | None, ppl: bool) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if ppl else f"{value:.4f}"


def format_row(row: CompareRow) -> tuple[str, str, str, str]:
    ppl = row.lower_is_better
    delta = row.delta
    if delta is None:
        text = "-"
    elif ppl and row.a:
        text = f"{delta:+.4g} (x{row.b / row.a:.3g})"  # perplexities multiply; a ratio reads better than %
    else:
        text = f"{delta:+.4f}"
    return row.label, _fmt(row.a, ppl), _fmt(row.b, ppl), text


def compare_markdown(a: dict, b: dict, name_a: str, name_b: str) -> str:
    lines = [f"A = {name_a}: {_model_line(a['model'])}", f"B = {name_b}: {_model_line(b['model'])}", "",
             "| metric | A | B | B - A |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(format_row(r)) + " |" for r in compare_rows(a, b)]
    notes = protocol_differences(a, b)
    if notes:
        lines += ["", "Not directly comparable: " + "; ".join(notes)]
    return "\n".join(lines) + "\n"
