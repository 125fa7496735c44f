"""One run: score -> select -> prune -> heal -> eval -> bench -> report, each stage a file in the run folder.

A stage whose output exists and was made with the current settings is skipped, so an interrupted run
resumes where it stopped (an iterative schedule resumes from its last finished round); output made
with other settings moves to stale/ and its stage runs again (run_stages.py). One run at a time holds
the folder (run_lock.py), so stages write with overwrite=True: whatever layerprune output sits at a
stage's path is that stage's own unfinished work. Every number in report.md comes from a file next to it.
"""

from __future__ import annotations

import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from layerprune.config import RunConfig
from layerprune.errors import LayerpruneError
from layerprune.importance import compute_many, get_metric
from layerprune.models.loading import LoadedModel, load_model
from layerprune.models.saving import package_versions, save_model
from layerprune.files.outputs import (
    MARKER, atomic_output_dir, check_not_input, is_layerprune_output, is_main_process, mark_output_dir, read_json,
    write_json,
)
from layerprune.runs.lock import run_folder_lock
from layerprune.runs.stages import Stage, settings_digest, settle
from layerprune.selection.strategies import iterative_rounds

Log = Callable[[str], None]


class Run:
    """One run folder. With `shared_dir` (a study), work that several settings have in common (scores,
    the pruned model, the original's evaluation) is done once there and linked into each run folder."""

    def __init__(self, config: RunConfig, log: Log = print, shared_dir: str | Path | None = None):
        from layerprune.hardware.estimate import Plan

        self.plan = Plan("run")  # replaced by the estimated plan once the original is loaded
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
        return self.shared_dir / f"{Path(name).name}-{settings_digest(key)}"

    def expose(self, name: str, target: Path) -> None:
        """Link shared output into the run folder (relative link, so the study folder can move)."""
        link = self.path(name)
        if target == link or link.is_symlink() or link.exists() or not target.exists():
            return
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent))

    def base_settings(self) -> dict:
        """What every stage's output depends on: the model, its dtype and the seed."""
        c = self.config
        return {"model": c.model, "dtype": c.dtype, "seed": c.seed}

    def stage_settings(self, name: str) -> dict:
        """The settings of stage `name`: one key for the stage ledger (stages.json) and the study's shared cache."""
        return next(stage.settings for stage in self.stages() if stage.name == name)

    def load(self, ref: str, tokenizer_from: LoadedModel | None = None, *, saved: bool = False,
             dtype: str | None = None) -> LoadedModel:
        """The model at `ref` (in the run's dtype unless given), with `tokenizer_from`'s tokenizer when its
        folder has none. saved: its weights will be written (pruned, healed), so they keep their dtype;
        otherwise it is only computed with, and dtype auto takes fp32 where the CPU only emulates the stored
        half type."""
        loaded = load_model(ref, dtype=dtype or self.config.dtype, for_compute=not saved)
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
        main = is_main_process()
        if main:
            self.claim_folder()
        with run_folder_lock(self.dir) if main else nullcontext():
            if main:
                settle(self.dir, self.stages(), self.log)
            from layerprune.models.model_config import loading_options

            with loading_options(trust_remote_code=self.config.trust_remote_code):  # every model the run loads
                return self._execute()

    def claim_folder(self) -> None:
        """Refuse a run folder that is or holds an input, or holds files layerprune did not write; mark it."""
        check_not_input(self.dir, self.inputs(), replaces=False)
        if self.dir.exists() and not self.dir.is_dir():
            raise LayerpruneError(f"run folder {self.dir} exists and is not a folder")
        if self.dir.is_dir() and any(self.dir.iterdir()) and not is_layerprune_output(self.dir):
            raise LayerpruneError(f"run folder {self.dir} holds files that layerprune did not write (it has no "
                                  f"{MARKER} file); choose another out")
        self.dir.mkdir(parents=True, exist_ok=True)
        mark_output_dir(self.dir)

    def inputs(self) -> list:
        """The model and data the run reads (local paths among them must stay outside the run folder)."""
        c = self.config
        refs = [c.model, c.prune.calibration.source] + ([c.curve.calibration.source] if c.curve else [])
        refs += [ref for stage in c.heal for ref in (stage.data, stage.teacher)]
        if c.eval:
            refs += [c.eval.tasks, c.eval.ppl]
        return refs

    def stages(self) -> list[Stage]:
        """The stages this config runs, each with everything its output depends on and the names it writes."""
        c = self.config
        base = self.base_settings()
        pruned = self.stage_base()
        final = self.heal_settings(pruned, len(c.heal))
        evaluation = c.eval.model_dump(mode="json", exclude={"original", "before_healing"}) if c.eval else None
        plan = []
        if c.eval and c.eval.original:
            plan.append(Stage("eval-original", {**base, "eval": evaluation}, ("eval-original",)))
        if c.curve:
            plan.append(Stage("curve", {**base, "curve": c.curve.model_dump(mode="json")}, ("curve",)))
        if c.prune.strategy == "iterative":
            plan.append(Stage("rounds", final, ("rounds",)))
        else:
            plan.append(Stage("prune", pruned, ("scores.json", "selection.json", "pruned", "scores.png",
                                                "angular.png")))
            if c.eval and c.eval.before_healing and c.heal:
                plan.append(Stage("eval-pruned", {**pruned, "eval": evaluation}, ("eval-pruned",)))
            for number in range(1, len(c.heal) + 1):
                settings = self.heal_settings(pruned, number)
                name = f"healed-{number}"
                plan.append(Stage(name, settings, (name, _work_dir_name(name, settings))))
        if c.eval:
            plan.append(Stage("eval-final", {**final, "eval": evaluation}, ("eval-final",)))
        if c.bench:
            plan.append(Stage("bench", {**final, "bench": c.bench.model_dump(mode="json")}, ("bench",)))
        plan.append(Stage("report", c.model_dump(mode="json", exclude={"out"}),
                          ("report.md", "run.json", "loss_curves.png", "layer_map.png")))
        return plan

    def stage_base(self) -> dict:
        """The settings the pruned model depends on."""
        return {**self.base_settings(), "prune": self.config.prune.model_dump(mode="json")}

    def heal_settings(self, base: dict, number: int) -> dict:
        """What heal stage `number` (1-based) depends on: its input's settings and heal stages 1..number."""
        return {**base, "heal": [stage.model_dump(mode="json") for stage in self.config.heal[:number]]}

    def _execute(self) -> dict:
        (self.dir / "config.yaml").write_text(_yaml(self.config.model_dump(mode="json")))
        write_json(self.path("versions.json"), package_versions())
        started = time.perf_counter()
        original = self.load(self.config.model)
        self.plan = self.time_plan(original)
        torch.manual_seed(self.config.seed)
        if self.config.eval and self.config.eval.original:
            with self.plan.timed("eval-original"):
                self.evaluate("eval-original", original, key=self.stage_settings("eval-original"))
        if self.config.curve:
            with self.plan.timed("curve"):
                self.curve(original)
        if self.config.prune.strategy == "iterative":
            with self.plan.timed("rounds"):
                final_ref = self.iterative(original)
        else:
            with self.plan.timed("prune"):
                self.one_shot(original)
            if self.config.eval and self.config.eval.before_healing and self.config.heal:
                with self.plan.timed("eval-pruned"):
                    self.evaluate("eval-pruned", self.load(str(self.path("pruned")), original),
                                  key=self.stage_settings("eval-pruned"))
            final_ref = self.heal_chain(str(self.path("pruned")), original, base=self.stage_base())
        final = self.load(final_ref, original)
        if self.config.eval:
            with self.plan.timed("eval-final"):
                self.evaluate("eval-final", final)
        if self.config.bench:
            with self.plan.timed("bench"):
                self.benchmark(original, final)
        with self.plan.timed("report"):
            summary = self.report(final_ref)
        summary["wall_time_s"] = round(time.perf_counter() - started, 1)
        summary["stage_times"] = self.plan.to_json()
        write_json(self.path("run.json"), summary)
        for line in self.plan.lines(with_actual=True):
            self.log(line)
        return summary

    def time_plan(self, original: LoadedModel):
        """Time a forward of the original here, estimate every stage from it and print the plan."""
        from layerprune.hardware.compute import compute_choice
        from layerprune.hardware.estimate import measure_speed
        from layerprune.runs.plan import plan_run

        speed = measure_speed(original.model)
        heal_speed = speed
        if self.config.heal:
            device = next(original.model.parameters()).device
            heal_speed = measure_speed(original.model, compute=compute_choice(device, self.config.heal[0].bf16))
        done = {stage.name for stage in self.stages() if self.path(stage.outputs[0]).exists()}
        plan = plan_run(self, original.model, speed, heal_speed, done)
        for line in plan.lines():
            self.log(line)
        return plan

    def one_shot(self, original: LoadedModel) -> None:
        """Choose on the original (scores cached in scores.json), cut a copy loaded as stored, save it."""
        from layerprune.selection.strategies import PruneHooks, prune

        selection, pruned_dir = self.path("selection.json"), self.path("pruned")
        if self.shared_dir is not None:  # a study: selection and pruned model live in the shared folder
            where = self.shared_path("prune", self.stage_settings("prune"))
            selection, pruned_dir = where / "selection.json", where / "pruned"
        if pruned_dir.is_dir():
            self.log("pruned model exists: skipping score/select/prune")
        else:
            pruned = self.load(self.config.model, saved=True)

            def select(number, model, n_drop):
                return read_json(selection, missing_ok=True) or self.choose(original)

            def saved(number, model, record):
                write_json(selection, record)  # only once it applied: a selection that fails must not be reused
                save_model(model, pruned.tokenizer, pruned_dir, overwrite=True, extra={"selection": record})
                granularity = self.config.prune.granularity  # block, or attention/MLP only (models/sublayer.py)
                what = "pruned" if granularity == "block" else f"removed the {granularity} of"
                self.log(f"{what} original layers {record['dropped']} ({record['chosen_by']})")

            prune(pruned.model, self.config.prune, PruneHooks(select=select, saved=saved), log=self.log)
        self.expose("selection.json", selection)
        self.expose("pruned", pruned_dir)

    def curve(self, original: LoadedModel) -> None:
        """The trade-off curve of the unpruned model (layerprune.selection.curve): curve/curve.json, .csv and .png."""
        from layerprune.selection.curve import curve_for_loaded, write_curve_files

        if (self.path("curve") / "curve.json").exists():
            return
        self.log("tracing the trade-off curve")
        write_curve_files(self.path("curve"), curve_for_loaded(original, self.config.curve, log=self.log),
                          overwrite=True)

    def choose(self, loaded: LoadedModel, n_drop: int | None = None, scores_name: str = "scores.json") -> dict:
        """The selection record (strategies.choose), with every metric's scores cached in `scores_name`."""
        from layerprune.data.calibration import VALIDATION_SEED_OFFSET
        from layerprune.importance.scores_file import read_scores_json, write_scores_json
        from layerprune.selection.strategies import choose

        scores_path = self.path(scores_name)

        def cached_scores(requests: dict[str, dict]) -> dict:
            if scores_path.exists():
                return read_scores_json(scores_path)[0]
            scores = self.scores(loaded, requests, share=scores_name == "scores.json")
            write_scores_json(scores_path, self.config.model, scores)
            return scores

        return choose(loaded.model, self.config.prune, score=cached_scores, n_drop=n_drop, log=self.log,
                      validation=lambda: self.calibration(loaded.tokenizer, seed_offset=VALIDATION_SEED_OFFSET))

    def scores(self, loaded: LoadedModel, requests: dict[str, dict], share: bool) -> dict:
        """Scores of each requested metric; in a study, each metric's scores are computed once and shared."""
        from layerprune.importance import LayerScores

        text = {**self.base_settings(), "calibration": self.config.prune.calibration.model_dump(mode="json")}
        paths = {name: self.shared_path(f"scores-{name}.json", {**text, "metric": name, "params": params})
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

    def heal_chain(self, ref: str, tokenizer_from: LoadedModel, prefix: str = "healed", *, base: dict) -> str:
        """Run each heal stage in order on the previous stage's output; returns the final model folder.

        base: the settings `ref` depends on. Each stage's checkpoints live in a work folder named by the
        digest of its settings, so an interrupted stage only ever resumes under the same settings."""
        from layerprune.api import heal_loaded, write_healed

        for number, stage in enumerate(self.config.heal, 1):
            out = self.path(f"{prefix}-{number}")
            if out.is_dir():
                self.log(f"{out.name} exists: skipping")
                ref = str(out)
                continue
            loaded = self.load(ref, tokenizer_from, saved=True, dtype=stage.train_dtype)
            self.log(f"healing with {stage.method} ({out.name})")
            work = out.with_name(_work_dir_name(out.name, self.heal_settings(base, number)))
            with self.plan.timed(out.name) if prefix == "healed" else nullcontext():
                result, record = heal_loaded(loaded, stage, default_teacher=self.config.model, work_dir=work,
                                             resume=work.exists(), log=self.log)
            if not is_main_process():
                return str(out)  # under accelerate/torchrun only the main process writes
            write_healed(result, record, loaded.tokenizer, out, overwrite=True)
            shutil.rmtree(work, ignore_errors=True)
            ref = str(out)
        return ref

    def iterative(self, original: LoadedModel) -> str:
        """Score -> drop `step` layers -> heal, until `total` are gone; each round is a folder
        (rounds/round-N: scores.json, selection.json, pruned/, healed-*/, done.json) and resumes from it."""
        from layerprune.selection.strategies import PruneHooks, prune

        def round_dir(number: int) -> Path:
            return self.path(f"rounds/round-{number}")

        def finished(number: int) -> dict | None:
            done = read_json(round_dir(number) / "done.json", missing_ok=True)
            return read_json(round_dir(number) / "selection.json") if done else None

        def reload(number: int):
            ref = read_json(round_dir(number) / "done.json")["model"] if number else self.config.model
            return self.load(ref, original, saved=True).model

        def select(number, model, n_drop):
            round_dir(number).mkdir(parents=True, exist_ok=True)
            scores = f"rounds/round-{number}/scores.json"
            current = LoadedModel(model=model, tokenizer=original.tokenizer, ref="", path="")
            return read_json(round_dir(number) / "selection.json", missing_ok=True) or \
                self.choose(current, n_drop, scores_name=scores)

        def saved(number, model, record):
            write_json(round_dir(number) / "selection.json", record)  # only once it applied
            save_model(model, original.tokenizer, round_dir(number) / "pruned", overwrite=True,
                       extra={"selection": record})

        def heal(model, number):
            ref = self.heal_chain(str(round_dir(number) / "pruned"), original,
                                  prefix=f"rounds/round-{number}/healed", base={**self.stage_base(), "round": number})
            selection = read_json(round_dir(number) / "selection.json")
            write_json(round_dir(number) / "done.json", {"model": ref, "dropped": selection["dropped"]})
            return self.load(ref, original, saved=True).model if number < rounds else None  # the last: read later

        rounds = len(iterative_rounds(self.config.prune))
        prune(None, self.config.prune, PruneHooks(select=select, finished=finished, reload=reload, saved=saved,
                                                  heal=heal), log=self.log)
        return read_json(round_dir(rounds) / "done.json")["model"]

    def evaluate(self, name: str, loaded: LoadedModel, key: dict | None = None) -> dict:
        from layerprune.evaluation.protocol import plan_eval, run_eval, write_eval

        out = self.shared_path(name, key) if key is not None else self.path(name)
        if (out / "eval.json").exists():
            self.expose(name, out)
            return read_json(out / "eval.json")
        plan = plan_eval(self.config.eval)
        self.log(f"evaluating {name}")
        result = run_eval(loaded, plan)
        write_eval(out, result, plan, overwrite=True)  # overwrite: see the module doc
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
        with atomic_output_dir(out, overwrite=True) as tmp:
            write_outputs(tmp, base, other)

    def report(self, final_ref: str) -> dict:
        from layerprune.report.rebuild import write_run_report

        summary, _ = write_run_report(self.dir, final_ref)
        return summary


def _work_dir_name(output_name: str, settings: dict) -> str:
    return f".{output_name}.checkpoints-{settings_digest(settings)}"


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def run_pipeline(config: RunConfig, log: Log = print, shared_dir: str | Path | None = None) -> dict:
    return Run(config, log, shared_dir).execute()
