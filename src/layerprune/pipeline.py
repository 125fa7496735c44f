"""One run: score -> select -> prune -> heal -> eval -> bench -> report, each stage a file in the run folder.

A stage whose output exists is skipped, so an interrupted run resumes where it stopped (an
iterative schedule resumes from its last finished round). Every number in report.md comes from a
file next to it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from layerprune.config import RunConfig
from layerprune.importance import compute_many, get_metric
from layerprune.models.loading import LoadedModel, load_model
from layerprune.models.saving import package_versions, save_model
from layerprune.models.sublayer import remove_units
from layerprune.outputs import read_json, write_json
from layerprune.strategies import history_entry

Log = Callable[[str], None]


class Run:
    """One run folder. With `shared_dir` (a study), work that several settings have in common (scores,
    the pruned model, the original's evaluation) is done once there and linked into each run folder."""

    def __init__(self, config: RunConfig, log: Log = print, shared_dir: str | Path | None = None):
        self.config = config
        self.dir = Path(config.out)
        self.log = log
        self.shared_dir = Path(shared_dir) if shared_dir is not None else None

    # ------------------------------------------------------------------ helpers
    def path(self, name: str) -> Path:
        return self.dir / name

    def shared_path(self, name: str, key: dict) -> Path:
        """Where output `name` is made: in the run folder, or in the study's shared folder under a name
        that hashes everything the output depends on (`key`), so equal work is found and reused."""
        if self.shared_dir is None:
            return self.path(name)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return self.shared_dir / f"{Path(name).name}-{digest}"

    def expose(self, name: str, target: Path) -> None:
        """Link shared output into the run folder (relative link, so the study folder can move)."""
        link = self.path(name)
        if target == link or link.is_symlink() or link.exists() or not target.exists():
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent))

    def _key(self, *parts: str) -> dict:
        c = self.config
        key = {"model": c.model, "dtype": c.dtype, "seed": c.seed}
        if "calibration" in parts:
            key["calibration"] = c.prune.calibration.model_dump(mode="json")
        if "prune" in parts:
            key["prune"] = c.prune.model_dump(mode="json")
        if "eval" in parts and c.eval is not None:
            key["eval"] = c.eval.model_dump(mode="json", exclude={"original", "before_healing"})
        return key

    def load(self, ref: str, tokenizer_from: LoadedModel | None = None) -> LoadedModel:
        loaded = load_model(ref, dtype=self.config.dtype)
        if loaded.tokenizer is None and tokenizer_from is not None:
            loaded.tokenizer = tokenizer_from.tokenizer
        return loaded

    def calibration(self, tokenizer, seed_offset: int = 0):
        from layerprune.data.calibration import load_calibration

        c = self.config.prune.calibration
        return load_calibration(tokenizer, c.source, n_samples=c.n_samples, seq_len=c.seq_len,
                                seed=c.seed + seed_offset, field=c.field)

    # ------------------------------------------------------------------ stages
    def execute(self) -> dict:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.yaml").write_text(_yaml(self.config.model_dump(mode="json")))
        write_json(self.path("versions.json"), package_versions())
        started = time.perf_counter()
        original = self.load(self.config.model)
        torch.manual_seed(self.config.seed)
        if self.config.eval and self.config.eval.original:
            self.evaluate("eval-original", original, key=self._key("eval"))
        if self.config.prune.strategy == "iterative":
            final_ref = self.iterative(original)
        else:
            self.one_shot(original)
            if self.config.eval and self.config.eval.before_healing and self.config.heal:
                self.evaluate("eval-pruned", self.load(str(self.path("pruned")), original),
                              key=self._key("calibration", "prune", "eval"))
            final_ref = self.heal_chain(str(self.path("pruned")), original)
        final = self.load(final_ref, original)
        if self.config.eval:
            self.evaluate("eval-final", final)
        if self.config.bench:
            self.benchmark(original, final)
        summary = self.report(final_ref)
        summary["wall_time_s"] = round(time.perf_counter() - started, 1)
        write_json(self.path("run.json"), summary)
        return summary

    def one_shot(self, original: LoadedModel) -> None:
        selection, pruned_dir = self.path("selection.json"), self.path("pruned")
        if self.shared_dir is not None:  # a study: selection and pruned model live in the shared folder
            where = self.shared_path("prune", self._key("calibration", "prune"))
            selection, pruned_dir = where / "selection.json", where / "pruned"
        if pruned_dir.is_dir():
            self.log("pruned model exists: skipping score/select/prune")
        else:
            if not selection.exists():
                write_json(selection, self.choose(original))
            record = read_json(selection)
            pruned = self.load(self.config.model)
            granularity = self.config.prune.granularity  # block, or attention/MLP only (models/sublayer.py)
            remove_units(pruned.model, record["dropped"], granularity, how=history_entry(record))
            save_model(pruned.model, pruned.tokenizer, pruned_dir, extra={"selection": record})
            what = "pruned" if granularity == "block" else f"removed the {granularity} of"
            self.log(f"{what} original layers {record['dropped']} ({record['chosen_by']})")
        self.expose("selection.json", selection)
        self.expose("pruned", pruned_dir)

    def choose(self, loaded: LoadedModel, n_drop: int | None = None, scores_name: str = "scores.json") -> dict:
        """The selection record (strategies.choose), with every metric's scores cached in `scores_name`."""
        from layerprune.importance import LayerScores
        from layerprune.strategies import VALIDATION_SEED_OFFSET, choose

        scores_path = self.path(scores_name)

        def cached_scores(requests: dict[str, dict]) -> dict:
            if scores_path.exists():
                return {n: LayerScores.from_json(s) for n, s in read_json(scores_path).items()}
            scores = self.scores(loaded, requests, share=scores_name == "scores.json")
            write_json(scores_path, {n: s.to_json() for n, s in scores.items()})
            return scores

        return choose(loaded.model, self.config.prune, score=cached_scores, n_drop=n_drop, log=self.log,
                      validation=lambda: self.calibration(loaded.tokenizer, seed_offset=VALIDATION_SEED_OFFSET))

    def scores(self, loaded: LoadedModel, requests: dict[str, dict], share: bool) -> dict:
        """Scores of each requested metric; in a study, each metric's scores are computed once and shared."""
        from layerprune.importance import LayerScores

        paths = {name: self.shared_path(f"scores-{name}.json", {**self._key("calibration"), "metric": name,
                                                                "params": params})
                 for name, params in requests.items()} if share and self.shared_dir else {}
        found = {n: LayerScores.from_json(read_json(p)) for n, p in paths.items() if p.exists()}
        missing = {n: params for n, params in requests.items() if n not in found}
        if missing:
            calibration = None
            if any(get_metric(n).needs_calibration for n in missing):
                calibration = self.calibration(loaded.tokenizer)
            for name, scores in compute_many(loaded.model, missing, calibration).items():
                found[name] = scores
                if name in paths:
                    write_json(paths[name], scores.to_json())
        return {name: found[name] for name in requests}

    def heal_chain(self, ref: str, tokenizer_from: LoadedModel, prefix: str = "healed") -> str:
        """Run each heal stage in order on the previous stage's output; returns the final model folder."""
        from layerprune.api import heal_loaded, write_healed

        for number, stage in enumerate(self.config.heal, 1):
            out = self.path(f"{prefix}-{number}")
            if out.is_dir():
                self.log(f"{out.name} exists: skipping")
                ref = str(out)
                continue
            loaded = load_model(ref, dtype=stage.train_dtype)
            if loaded.tokenizer is None:
                loaded.tokenizer = tokenizer_from.tokenizer
            self.log(f"healing with {stage.method} ({out.name})")
            work = self.path(f".{out.name}.checkpoints")
            result, record = heal_loaded(loaded, stage, default_teacher=self.config.model, work_dir=work,
                                         resume=work.exists())
            if int(os.environ.get("RANK", "0")) != 0:
                return str(out)  # under accelerate/torchrun only the main process writes
            write_healed(result, record, loaded.tokenizer, out)
            shutil.rmtree(work, ignore_errors=True)
            ref = str(out)
        return ref

    def iterative(self, original: LoadedModel) -> str:
        """Score -> drop `step` layers -> heal, until `total` are gone; each round is a folder."""
        from layerprune.strategies import iterative_rounds

        steps = iterative_rounds(self.config.prune)
        ref, rounds = self.config.model, len(steps)
        for r, step in enumerate(steps, 1):
            round_dir = self.path(f"rounds/round-{r}")
            if (round_dir / "done.json").exists():
                ref = read_json(round_dir / "done.json")["model"]
                continue
            round_dir.mkdir(parents=True, exist_ok=True)
            current = self.load(ref, original)
            selection = round_dir / "selection.json"
            if not selection.exists():
                write_json(selection, self.choose(current, step, scores_name=f"rounds/round-{r}/scores.json"))
            record = read_json(selection)
            pruned_dir = round_dir / "pruned"
            if not pruned_dir.is_dir():
                remove_units(current.model, record["dropped"], "block", how={**history_entry(record), "round": r})
                save_model(current.model, current.tokenizer, pruned_dir, extra={"selection": record})
            self.log(f"round {r}/{rounds}: dropped original layers {record['dropped']}")
            ref = self.heal_chain(str(pruned_dir), original, prefix=f"rounds/round-{r}/healed")
            write_json(round_dir / "done.json", {"model": ref, "dropped": record["dropped"]})
        return ref

    def evaluate(self, name: str, loaded: LoadedModel, key: dict | None = None) -> dict:
        from layerprune.evaluation.run import plan_eval, run_eval, write_eval

        out = self.shared_path(name, key) if key is not None else self.path(name)
        if (out / "eval.json").exists():
            self.expose(name, out)
            return read_json(out / "eval.json")
        plan = plan_eval(self.config.eval)
        self.log(f"evaluating {name}")
        result = run_eval(loaded, plan)
        write_eval(out, result, plan)
        self.expose(name, out)
        return result.record

    def benchmark(self, original: LoadedModel, final: LoadedModel) -> None:
        from layerprune.benchmark import benchmark, write_outputs

        out = self.path("bench")
        if (out / "bench.json").exists():
            return
        config = self.config.bench
        self.log("benchmarking original vs final")
        base = benchmark(original.model, original.tokenizer, config, name="original")
        other = benchmark(final.model, final.tokenizer, config, name="final")
        out.mkdir(parents=True, exist_ok=True)
        write_outputs(out, base, other)

    def report(self, final_ref: str) -> dict:
        from layerprune.report.rebuild import write_run_report

        summary, _ = write_run_report(self.dir, final_ref)
        return summary


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def run_pipeline(config: RunConfig, log: Log = print, shared_dir: str | Path | None = None) -> dict:
    return Run(config, log, shared_dir).execute()
