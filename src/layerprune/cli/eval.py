"""`layerprune eval` and `layerprune eval-compare`: thin typer commands over layerprune.evaluation."""

from __future__ import annotations

import os
from typing import Optional

import typer
from rich.table import Table

from layerprune.cli.app import MODEL_HELP, app, console, trust_remote_code_option, user_errors
from layerprune.cli.options import config_from_options, config_option
from layerprune.common.config_base import DEFAULT_DTYPE
from layerprune.errors import LayerpruneError
from layerprune.evaluation.config import DEFAULT_PPL_WINDOWS, DEFAULT_TASK_LIMIT, EvalConfig
from layerprune.evaluation.results import (
    check_comparable,
    compare_markdown,
    compare_rows,
    format_row,
    load_eval,
    plus_minus,
    ppl_protocol,
    protocol_differences,
    task_title,
)
from layerprune.files.outputs import check_not_input, write_text

E = EvalConfig


@app.command("eval")
@user_errors
def eval_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: str = typer.Option(..., "--out", "-o", help="Folder for eval.json, eval.md, samples.json."),
    tasks: Optional[str] = config_option(E, "tasks"),
    ppl: Optional[str] = config_option(E, "ppl"),
    ppl_field: Optional[str] = config_option(E, "ppl_field"),
    seq_len: Optional[int] = config_option(E, "seq_len"),
    stride: Optional[int] = config_option(E, "stride"),
    bos: Optional[str] = config_option(E, "bos"),
    ppl_windows: Optional[int] = config_option(E, "ppl_windows"),
    limit: Optional[int] = config_option(E, "limit"),
    batch_size: Optional[int] = config_option(E, "batch_size"),
    avg_metric: Optional[str] = config_option(E, "avg_metric"),
    scorer: Optional[str] = config_option(E, "scorer"),
    data_source: Optional[str] = config_option(E, "data_source"),
    follow: Optional[int] = config_option(E, "follow"),
    follow_new_tokens: Optional[int] = config_option(E, "follow_new_tokens"),
    reference: Optional[str] = config_option(E, "reference"),
    samples: Optional[bool] = config_option(E, "samples"),
    max_new_tokens: Optional[int] = config_option(E, "max_new_tokens"),
    humaneval_max_new_tokens: Optional[int] = config_option(E, "humaneval_max_new_tokens"),
    humaneval_timeout: Optional[float] = config_option(E, "humaneval_timeout"),
    dtype: str = typer.Option(DEFAULT_DTYPE, help="auto | bf16 | fp16 | fp32"),
    trust_remote_code: bool = trust_remote_code_option(),
    device_map: Optional[str] = typer.Option(None, help="'auto' to spread a large model over devices (accelerate)."),
    load_in: Optional[str] = typer.Option(
        None, help="Quantize the linear layers while loading (bitsandbytes): 4bit (NF4) | 8bit (LLM.int8)."
    ),
    overwrite: bool = typer.Option(False, help="Replace an existing output folder that layerprune wrote."),
    streaming: bool = typer.Option(
        False, "--streaming", help="Perplexity with one decoder layer in memory at a time, for models bigger than "
        "memory (needs --tasks none; chosen by itself when the weights do not fit and --tasks none)."),
) -> None:
    """WikiText-2 perplexity and the paper's 8 zero-shot tasks (lm-evaluation-harness), and opt-in HumanEval of a
    model. By default a quick look: the first 300 perplexity windows and 5 documents of each (sub)task;
    --limit 0 --ppl-windows 0 is the full protocol."""
    from layerprune.api import evaluate_model  # start-up: `--help` loads no torch (cli/__init__.py)

    eval_config = config_from_options(EvalConfig, locals())
    quick = (eval_config.tasks and limit is None and eval_config.limit == DEFAULT_TASK_LIMIT) or (
        eval_config.ppl and ppl_windows is None and eval_config.ppl_windows == DEFAULT_PPL_WINDOWS)
    if quick:
        console.print("(the quick default: a few minutes for a ~100M model on 2 CPU cores; --limit 0 --ppl-windows 0 "
                      "is the full protocol, --tasks none skips the zero-shot tasks)", highlight=False)
    result = evaluate_model(model, eval_config, out=out, streaming=streaming, dtype=dtype, device_map=device_map,
                            load_in=load_in, overwrite=overwrite, log=lambda line: console.print(line, highlight=False))
    _print_record(result.record)
    walls = result.record["wall_time_s"]
    parts = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in walls.items() if name != "total")
    console.print(f"wall time {walls['total']:.0f} s ({parts}); wrote eval.json, eval.md"
                  f"{', samples.json' if result.samples is not None else ''}"
                  f"{', humaneval.jsonl' if result.humaneval is not None else ''} to [bold]{out}[/]")


def _print_record(record: dict) -> None:
    """The zero-shot table, HumanEval and the perplexities of an eval.json record."""
    if record.get("average"):
        limit = (record["protocol"].get("tasks") or {}).get("limit")
        limited = f"first {limit} per (sub)task" if limit else "all documents"
        table = Table(title=f"zero-shot ({limited})")
        for column in ("task", "acc", "acc_norm", "n"):
            table.add_column(column, justify="left" if column == "task" else "right")
        for name, s in record["tasks"].items():
            if "acc" not in s:
                continue  # HumanEval: printed below
            acc, acc_norm = plus_minus(s["acc"], s["acc_stderr"]), plus_minus(s["acc_norm"], s["acc_norm_stderr"])
            table.add_row(task_title(name), acc, acc_norm, str(s["n"]))
        avg = record["average"]
        table.add_row(f"Avg Acc ({avg['metric']})", f"{avg['value']:.4f}" if avg["value"] is not None else "-", "", "")
        console.print(table)
    if "humaneval" in record["tasks"]:
        he = record["tasks"]["humaneval"]
        console.print(f"HumanEval pass@1: [bold]{he['pass@1']:.4f}[/] ({he['passed']}/{he['n']} problems passed, "
                      f"{he['timed_out']} timed out; completions in humaneval.jsonl)")
    for name, r in record["perplexity"].items():
        console.print(f"{name} perplexity: [bold]{r['ppl']:.4g}[/] ({r['tokens']:,} tokens; {ppl_protocol(r)})")


@app.command("eval-compare")
@user_errors
def eval_compare(
    a: str = typer.Argument(..., help="An eval output folder (or its eval.json): the reference."),
    b: str = typer.Argument(..., help="Another eval output folder: deltas are B - A."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Also write the comparison as markdown to this file."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
) -> None:
    """Two evaluations side by side, with deltas (B - A)."""
    if out is not None:
        check_not_input(out, [a, b])
        if os.path.lexists(out) and not overwrite:  # a dangling symlink too: writing would make its target
            raise LayerpruneError(f"{out} already exists; pass --overwrite to replace it")
    ra, rb = load_eval(a), load_eval(b)
    check_comparable(ra, rb, a, b)
    table = Table(title=f"A = {a}   B = {b}")
    for column in ("metric", "A", "B", "B - A"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for row in compare_rows(ra, rb):
        table.add_row(*format_row(row))
    console.print(table)
    for note in protocol_differences(ra, rb):
        console.print(f"[yellow]not directly comparable:[/] {note}", highlight=False)
    if out is not None:
        write_text(out, compare_markdown(ra, rb, a, b))  # atomic; a symlink is replaced, never written through
        console.print(f"wrote {out}")
