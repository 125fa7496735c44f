"""One run: score -> select -> prune -> heal -> eval -> bench -> report, each stage a file in the run folder.

Three parts: runs/planner.py turns the config into stages (pure), runs/steps.py has one function per
stage, and `Run` here is the loop: claim and lock the folder, settle the stage ledger (a stage whose
output exists and was made with the current settings is skipped, so an interrupted run resumes where it
stopped; output made with other settings moves to stale/ and its stage runs again, runs/stages.py),
load the original, print the time plan, run each stage. Every number in report.md comes from a file
next to it.
"""

from __future__ import annotations

import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from layerprune.config import RunConfig
from layerprune.data.calibration import load_calibration
from layerprune.files.outputs import claim_folder, is_main_process, write_json, write_text
from layerprune.hardware.compute import compute_choice
from layerprune.hardware.speed import busy_note, measure_speed
from layerprune.models.loading import LoadedModel, load_model
from layerprune.models.model_config import loading_options
from layerprune.models.saving import package_versions
from layerprune.planning.estimate import Plan
from layerprune.planning.job import announce_plan
from layerprune.planning.run_time import plan_run
from layerprune.runs.lock import run_folder_lock
from layerprune.runs.planner import plan_stages, run_inputs
from layerprune.runs.stages import settings_digest, settle
from layerprune.runs.steps import STEPS

Log = Callable[[str], None]


class Run:
    """One run folder and the state its stages share: the loaded original and `current`, the model folder
    the next stage works on. With `shared_dir` (a study), work that several settings have in common
    (scores, the pruned model, the original's evaluation) is done once there and linked into each run folder."""

    def __init__(self, config: RunConfig, log: Log = print, shared_dir: str | Path | None = None):
        self.plan = Plan("run")  # replaced by the estimated plan once the original is loaded
        self.config = config
        self.dir = Path(config.out)
        self.log = log
        self.shared_dir = Path(shared_dir) if shared_dir is not None else None
        self.original: LoadedModel | None = None
        self.current: str = config.model
        self.summary: dict = {}
        self._final: tuple[str, LoadedModel] | None = None

    # ------------------------------------------------------------------ the loop
    def execute(self) -> dict:
        main = is_main_process()
        if main:
            self.claim_folder()
        with run_folder_lock(self.dir) if main else nullcontext():
            if main:
                settle(self.dir, plan_stages(self.config), self.log)

            with loading_options(trust_remote_code=self.config.trust_remote_code):  # every model the run loads
                return self._execute()

    def _execute(self) -> dict:
        write_text(self.dir / "config.yaml", _yaml(self.config.model_dump(mode="json")))
        write_json(self.path("versions.json"), package_versions())
        started = time.perf_counter()

        announce_plan(self.config.model, self.config.heal[0] if self.config.heal else None, prune=self.config.prune,
                      log=self.log)  # a model over 1B parameters: the memory plan before it loads
        self.original = self.load(self.config.model)
        self.plan = self.time_plan()
        torch.manual_seed(self.config.seed)
        for stage in plan_stages(self.config):
            with self.plan.timed(stage.name):
                STEPS[stage.step](self, stage)
            self.log(self.plan.progress_line(stage.name))  # the stages left, re-estimated at the real pace
        summary = {**self.summary, "wall_time_s": round(time.perf_counter() - started, 1),
                   "stage_times": self.plan.to_json()}
        write_json(self.path("run.json"), summary)
        for line in self.plan.lines(with_actual=True):
            self.log(line)
        return summary

    def claim_folder(self) -> None:
        """Refuse a run folder that is or holds an input, or holds files layerprune did not write; mark it."""
        claim_folder(self.dir, run_inputs(self.config))

    def time_plan(self):
        """Time a forward of the original here, estimate every stage from it and print the plan."""
        model = self.original.model
        speed = measure_speed(model)
        heal_speed = speed
        if self.config.heal:
            device = next(model.parameters()).device
            heal_speed = measure_speed(model, compute=compute_choice(device, self.config.heal[0].bf16))
        stages = plan_stages(self.config)
        done = {stage.name for stage in stages if self.path(stage.outputs[0]).exists()}
        plan = plan_run(self.config, stages, self.dir, model, speed, heal_speed, done)
        for line in plan.lines():
            self.log(line)
        busy = busy_note()
        if busy:
            self.log(busy)
        return plan

    # ------------------------------------------------------------------ what the steps share
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

    def final(self) -> LoadedModel:
        """The model the last prune/heal stage made (loaded once for eval-final and bench)."""
        if self._final is None or self._final[0] != self.current:
            self._final = (self.current, self.load(self.current, self.original))
        return self._final[1]

    def calibration(self, tokenizer, seed_offset: int = 0):
        c = self.config.prune.calibration
        return load_calibration(tokenizer, c.source, n_samples=c.n_samples, seq_len=c.seq_len,
                                seed=c.seed + seed_offset, field=c.field)


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def run_pipeline(config: RunConfig, log: Log = print, shared_dir: str | Path | None = None) -> dict:
    return Run(config, log, shared_dir).execute()
