"""The GPU check: what only a GPU machine can show, in one run and one table (`bench/gpu_check.sh`).

Each step runs a stock `layerprune` command (or a bench script) in its own process and reports ok,
skipped (and why: no CUDA, no bitsandbytes, fewer than 2 GPUs) or failed (its last output line), with its
wall time and one figure:

1. env: the devices layerprune sees and the dtype it computes in;
2. prune SmolLM2-135M by 25% (block influence) on the GPU;
3. heal it with the default recipe (distillation) on the GPU, bf16;
4. evaluate it (ARC-e + WikiText-2) on the GPU;
5. LoRA healing over a 16-bit frozen base (CUDA): a few steps, the peak GPU memory and the dtype the frozen
   base was held in (bfloat16 where the GPU computes bf16: loaded so directly, never in fp32 first);
6. QLoRA healing with bitsandbytes (CUDA);
7. the shared-prefix scorer against stock HFLM (bench/eval_speed.py: identical accuracies, time ratio);
8. a full-weight heal with FSDP over 2 GPUs (`accelerate launch`, examples/accelerate/fsdp.yaml), when there
   are 2.

`--quick` shrinks every step (a few steps, a few documents) so the script itself can be checked on a CPU:
`python bench/gpu_check.py --quick --allow-cpu`. Results go to --out (JSON) and stdout (markdown).

    bash bench/gpu_check.sh            # = python bench/gpu_check.py --out runs/gpu-check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str], *, launcher: list[str] | None = None, timeout: int = 3600) -> tuple[bool, str, float]:
    """(ok, output, seconds) of one command in its own process."""
    command = (launcher or [sys.executable, "-m", "layerprune"]) + args
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout} s", time.perf_counter() - start
    output = (proc.stdout + proc.stderr).strip()
    return proc.returncode == 0, output, time.perf_counter() - start


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else ""


def devices() -> dict:
    import torch

    return {"cuda": torch.cuda.is_available(), "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0}


def lora_child(pruned: str, out: str, steps: int) -> None:
    """One LoRA heal in this process (`--lora-child`): a line of JSON with its peak GPU memory (None without
    CUDA), the dtype its frozen base was held in (heal.json's notes) and the dtype it computed in."""
    import torch

    from layerprune.api import finetune_model

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    result, _ = finetune_model(pruned, out=out, method="lora", data="c4", max_steps=steps, batch_size=4,
                               max_length=256, warmup_steps=0)
    print(json.dumps({"peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
                      "frozen_dtype": result.notes.get("frozen_dtype"), "compute": result.notes["compute"]["dtype"]}))


def steps(work: Path, quick: bool, found: dict) -> list[tuple[str, str | None, callable]]:
    """(name, why it is skipped or None, function returning (ok, figure, output, seconds))."""
    heal_steps = ["--max-steps", "3" if quick else "60"]
    limit = "5" if quick else "500"
    windows = "5" if quick else "100"
    pruned, healed = work / "pruned", work / "healed"

    def row(out: str, label: str) -> str:
        """The value of a printed table row (rich draws `│ label │ value │`) or a line starting with label."""
        for line in out.splitlines():
            cells = [cell.strip() for cell in line.strip("│ ").split("│")]
            if cells and cells[0].startswith(label):
                return cells[-1] if len(cells) > 1 else cells[0]
        return ""

    def prune():
        ok, out, s = run(["prune", "smollm2-135m", "--ratio", "0.25", "--out", str(pruned)])
        return ok, row(out, "dropped original layers"), out, s

    def heal():
        ok, out, s = run(["finetune", str(pruned), *heal_steps, "--out", str(healed)])
        return ok, f"final loss {row(out, 'final loss')}, computed in {row(out, 'computed in')}", out, s

    def evaluate():
        ok, out, s = run(["eval", str(healed), "--tasks", "arc_easy", "--limit", limit, "--ppl", "wikitext2",
                          "--ppl-windows", windows, "--no-samples", "--out", str(work / "eval")])
        figure = ""
        if ok:
            record = json.loads((work / "eval" / "eval.json").read_text())
            figure = (f"arc_easy acc {record['tasks']['arc_easy']['acc']:.3f}, wikitext2 ppl "
                      f"{record['perplexity']['wikitext2']['ppl']:.1f}")
        return ok, figure, out, s

    def lora16():
        ok, out, s = run(["bench/gpu_check.py", "--lora-child", str(pruned), str(work / "lora16"), heal_steps[1]],
                         launcher=[sys.executable])
        line = re.search(r'\{"peak_gpu_gib".*?\}', out)  # stdout's line, whatever stderr printed around it
        if not ok or line is None:
            return False, "", out, s
        found = json.loads(line.group(0))
        return ok, (f"peak GPU memory {found['peak_gpu_gib']} GiB, frozen base {found['frozen_dtype']}, computed "
                    f"in {found['compute']}"), out, s

    def qlora():
        ok, out, s = run(["finetune", str(pruned), "--method", "qlora", *heal_steps, "--out", str(work / "qlora")])
        return ok, last_line(out), out, s

    def scorer():
        out_file = work / "eval-speed.json"
        ok, out, s = run(["bench/eval_speed.py", "--tasks", "arc_easy", "--limit", limit, "--out", str(out_file)],
                         launcher=[sys.executable])
        return ok, last_line(out), out, s

    def fsdp():
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(ROOT / "examples" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "-m", "layerprune"]
        ok, out, s = run(["finetune", str(pruned), "--method", "full", *heal_steps, "--out", str(work / "fsdp")],
                         launcher=launcher)
        return ok, last_line(out), out, s

    no_cuda = None if found["cuda"] else "no CUDA device"
    try:
        import bitsandbytes  # noqa: F401

        no_bnb = no_cuda
    except ImportError:
        no_bnb = "bitsandbytes is not installed"
    return [("prune SmolLM2 25%", None, prune), ("heal (distill, bf16)", None, heal), ("eval", None, evaluate),
            ("LoRA over a 16-bit base", no_cuda, lora16), ("QLoRA heal", no_bnb, qlora), ("fast scorer vs HFLM", None, scorer),
            ("FSDP heal on 2 GPUs", None if found["gpus"] >= 2 else f"{found['gpus']} GPU(s)", fsdp)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/gpu-check")
    parser.add_argument("--quick", action="store_true", help="tiny settings: check the script itself")
    parser.add_argument("--allow-cpu", action="store_true", help="run the GPU steps on a CPU (with --quick)")
    parser.add_argument("--lora-child", nargs=3, metavar=("PRUNED", "OUT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.lora_child:  # one step's own process (lora16 below)
        pruned, out, count = args.lora_child
        lora_child(pruned, out, int(count))
        return
    found = devices()
    if not found["cuda"] and not args.allow_cpu:
        raise SystemExit("no CUDA device here; run on a GPU machine, or check the script with --quick --allow-cpu")
    work = Path(args.out).resolve()
    if work.exists():
        raise SystemExit(f"{work} exists; choose another --out")
    work.mkdir(parents=True)
    ok, env_out, _ = run(["env", "--json"])
    env = json.loads(env_out[env_out.index("{"):]) if ok and "{" in env_out else {}
    rows = []
    for name, skipped, step in steps(work, args.quick, found):
        if skipped:
            rows.append({"step": name, "status": f"skipped: {skipped}", "seconds": None, "figure": ""})
        else:
            ok, figure, output, seconds = step()
            (work / f"{len(rows) + 1:02d}-{name.split()[0].lower()}.log").write_text(output)
            rows.append({"step": name, "status": "ok" if ok else "failed", "seconds": round(seconds, 1),
                         "figure": figure if ok else last_line(output)})
        print(json.dumps(rows[-1]), flush=True)
    (work / "gpu-check.json").write_text(json.dumps({"devices": found, "env": env, "steps": rows}, indent=2))
    print(f"\n{found['gpus']} GPU(s); {json.dumps(env.get('gpus', 'no GPU report'))[:200]}")
    print("| step | status | wall | figure |")
    print("|---|---|---|---|")
    for r in rows:
        wall = f"{r['seconds']:.0f} s" if r["seconds"] is not None else "-"
        print(f"| {r['step']} | {r['status']} | {wall} | {r['figure']} |")
    if any(r["status"] == "failed" for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
