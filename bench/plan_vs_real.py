"""The time plan a run prints against what its stages took: on an idle machine and beside a competing torch
process, the same run settings, side by side.

`layerprune run` times a warmed-up forward of the loaded model, estimates every stage from it, and re-estimates
the rest at the measured pace after each stage. The promise is a factor of 2 per stage. This script runs the
quickstart's settings (by default with a shorter evaluation and healing budget, so both conditions take about
half an hour together; `--full` for the quickstart as it is) into a fresh folder twice: alone, then with a
second process multiplying matrices on every core the whole time (what a user's other job does to 2 cores).
It prints each stage's estimate, real time and their ratio per condition (run.json's stage_times), and exits
1 when a stage is off by more than 2x.

    python bench/plan_vs_real.py [--workdir /tmp/layerprune-plan-vs-real] [--full] [--conditions idle,busy]
    python bench/plan_vs_real.py --from RUN_FOLDER   # the table of a run already made (e.g. the quickstart's)

Results: docs/results.md "The time plan against the real stages". Times name the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import cpu_kind  # noqa: E402  (bench/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parent.parent
SHORTER = ["eval.limit=200", "eval.follow=30", "eval.ppl_windows=30", "heal.0.max_minutes=3"]
COMPETITOR = ("import torch\n"
              "a = torch.randn(1024, 1024)\n"
              "while True:\n"
              "    a = torch.tanh(a @ a)\n")
LIMIT = 2.0


def run(config: Path, out: Path, overrides: list[str]) -> float:
    shutil.rmtree(out, ignore_errors=True)
    args = [sys.executable, "-m", "layerprune", "run", str(config), "--set", f"out={out}"]
    for item in overrides:
        args += ["--set", item]
    start = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"layerprune run failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return time.perf_counter() - start


def stage_rows(out: Path) -> list[dict]:
    record = json.loads((out / "run.json").read_text())
    return [row for row in record["stage_times"] if not row.get("skipped") and row.get("seconds") is not None]


def table(results: dict[str, list[dict]]) -> tuple[str, bool]:
    lines = ["| condition | stage | estimated | took | took / estimated |", "|---|---|---|---|---|"]
    within = True
    for condition, rows in results.items():
        for row in rows:
            est, took = row["estimated_s"], row["seconds"]
            ratio = took / est if est else None
            if ratio is not None and not 1 / LIMIT <= ratio <= LIMIT:
                within = False
            cell = f"{ratio:.2f}" if ratio is not None else "-"
            lines.append(f"| {condition} | {row['stage']} | {est} s | {took} s | {cell} |")
    return "\n".join(lines), within


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="/tmp/layerprune-plan-vs-real")
    parser.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    parser.add_argument("--full", action="store_true", help="the quickstart's settings as they are")
    parser.add_argument("--conditions", default="idle,busy")
    parser.add_argument("--from", dest="existing", help="print the table of an existing run folder")
    args = parser.parse_args()
    print(f"CPU: {cpu_kind()}", flush=True)
    if args.existing:
        text, within = table({"as run": stage_rows(Path(args.existing))})
        print(text)
        raise SystemExit(0 if within else 1)
    overrides = [] if args.full else SHORTER
    results = {}
    for condition in args.conditions.split(","):
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR]) if condition == "busy" else None
        try:
            seconds = run(Path(args.config), Path(args.workdir) / condition, overrides)
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
        results[condition] = stage_rows(Path(args.workdir) / condition)
        print(f"{condition}: {seconds / 60:.1f} min", flush=True)
    text, within = table(results)
    print(text)
    print(f"every stage within {LIMIT}x: {'yes' if within else 'NO'}")
    (Path(args.workdir) / "plan_vs_real.json").write_text(json.dumps(results, indent=1))
    raise SystemExit(0 if within else 1)


if __name__ == "__main__":
    main()
