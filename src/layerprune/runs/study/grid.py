"""A study's grid: load the YAML, expand every combination into a validated run config, execute them."""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
import time
from pathlib import Path

from layerprune.common.config_base import build_config
from layerprune.config import RunConfig, apply_sets, read_yaml_mapping, set_dotted
from layerprune.errors import LayerpruneError
from layerprune.files.outputs import claim_folder, write_json
from layerprune.report.study_report import rebuild_study_report
from layerprune.runs.lock import run_folder_lock
from layerprune.runs.pipeline import Run
from layerprune.runs.planner import run_inputs
from layerprune.runs.study.similarity import similarity_stage

# Short names for the axes the papers vary; anything else is a dotted path into the run config.
GRID_ALIASES = {
    "metric": "prune.metric",
    "ratio": "prune.ratio",
    "num_layers": "prune.num_layers",
    "select": "prune.select",
    "granularity": "prune.granularity",
    "calibration_size": "prune.calibration.n_samples",
    "calibration_source": "prune.calibration.source",
    "heal_method": "heal.0.method",
    "heal_data": "heal.0.data",
    "learning_rate": "heal.0.learning_rate",
    "seed": "seed",
}
STRATEGY_AXIS = "strategy"  # one-shot | "1:k:N" / "k:N" (iterative); sets prune.strategy and prune.schedule
REPORT_OPTIONS = {"similarity"}
MAX_SETTINGS = 10_000  # each setting is a run: more is a typo, and expanding 10^8 of them never ends


def _apply(base: dict, axis: str, value) -> None:
    if axis == STRATEGY_AXIS:
        prune = base.setdefault("prune", {})
        if value == "one-shot":
            prune.update(strategy="one-shot", schedule=None)
        else:
            prune.update(strategy="iterative", schedule=str(value))
        return
    path = GRID_ALIASES.get(axis, axis)
    if path == "heal.0.method" and value in ("none", None):
        base["heal"] = []
        return
    set_dotted(base, path, value)


def setting_name(values: dict) -> str:
    """A folder name that says what the setting is: metric-taylor__heal_method-lora__strategy-1-4-8."""
    parts = []
    for axis, value in values.items():
        # the axis too: a key ending in "/abs/path" must not make the folder name a path
        parts.append(f"{_name_part(axis.split('.')[-1])}-{_name_part(str(value).replace(':', '-'))}")
    return "__".join(parts)


def _name_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.\-]+", "_", text).strip("_").lstrip(".") or "none"


class Study:
    def __init__(self, data: dict, source: str = "study"):
        data = copy.deepcopy(data)
        self.source = source
        grid = data.pop("grid", None)
        report = data.pop("report", None) or {}
        if not isinstance(grid, dict) or not grid:
            raise LayerpruneError(f"{source}: grid must map axes to lists of values")
        unknown = set(report) - REPORT_OPTIONS
        if unknown:
            raise LayerpruneError(f"{source}: report.{sorted(unknown)[0]} is not an option (known: similarity)")
        self.report_options = report
        for axis, values in grid.items():
            if not isinstance(values, list) or not values:
                raise LayerpruneError(f"{source}: grid.{axis} must be a non-empty list")
            if len(set(map(json.dumps, values))) != len(values):
                raise LayerpruneError(f"{source}: grid.{axis} lists a value twice")
        self.grid = grid
        self.out = Path(data.pop("out", None) or Path("runs") / Path(source).stem)
        self.base = data
        cells = math.prod(len(values) for values in grid.values())
        if cells > MAX_SETTINGS:
            raise LayerpruneError(f"{source}: the grid has {cells:,} settings, over the limit of {MAX_SETTINGS:,}; "
                                  "split it into several studies")
        self.settings = self._expand()

    def _expand(self) -> list[dict]:
        """Every combination, validated as a run config now (errors name the setting and key)."""
        settings = []
        axes = list(self.grid)
        for combo in itertools.product(*(self.grid[a] for a in axes)):
            values = dict(zip(axes, combo))
            name = setting_name(values)
            if any(s["name"] == name for s in settings):  # values that only differ in punctuation
                name = f"{name}__{len(settings)}"
            data = copy.deepcopy(self.base)
            for axis, value in values.items():
                _apply(data, axis, value)
            folder = self.out / "settings" / name
            if (self.out / "settings").resolve() not in folder.resolve().parents:
                raise LayerpruneError(f"{self.source}: grid axis names a folder outside the study ({name})")
            data["out"] = str(folder)
            config = build_config(RunConfig, data, where_prefix=f"{self.source}: setting {name}: ")
            settings.append({"name": name, "values": values, "config": config})
        return settings

    def execute(self, log=print) -> dict:
        # claimed like a run folder: never someone else's folder, never the model's or a data file's
        claim_folder(self.out, [ref for s in self.settings for ref in run_inputs(s["config"])], "study folder")
        with run_folder_lock(self.out):  # one `layerprune run` per study folder at a time
            return self._execute(log)

    def _execute(self, log) -> dict:
        started = time.perf_counter()
        status, final_models = {}, {}
        for number, setting in enumerate(self.settings, 1):
            name = setting["name"]
            log(f"[{number}/{len(self.settings)}] {name}")
            run = Run(setting["config"], log=lambda m, n=number: log(f"  {m}"), shared_dir=self.out / "shared")
            try:
                final_models[name] = run.execute()["final_model"]
                status[name] = "done"
            except Exception as err:  # one failed setting must not lose the others; rerun retries it
                status[name] = f"failed: {type(err).__name__}: {err}"
                log(f"  setting {name} failed: {err}")
            self._write_index(status)
        if self.report_options.get("similarity") and final_models:
            similarity_stage(self.out / "similarity.json", self.settings[0]["config"], final_models, log)
        record = rebuild_study_report(self.out)
        record["wall_time_s"] = round(time.perf_counter() - started, 1)
        write_json(self.out / "study.json", record)
        failed = [n for n, s in status.items() if s != "done"]
        if failed:
            raise LayerpruneError(f"{len(failed)} of {len(status)} settings failed ({', '.join(failed)}); "
                                  "see their messages above, fix and rerun (finished settings are kept)")
        return record

    def _write_index(self, status: dict) -> None:
        write_json(self.out / "study.json", {
            "source": self.source, "axes": list(self.grid),
            "settings": [{"name": s["name"], "values": s["values"], "dir": f"settings/{s['name']}",
                          "status": status.get(s["name"], "pending")} for s in self.settings],
            "report": self.report_options,
        })


def is_study(data: dict) -> bool:
    return "grid" in data


def load_study(path: str | Path, overrides: dict | None = None, sets: list[str] | None = None) -> Study:
    data = read_yaml_mapping(path)
    data.update(overrides or {})
    apply_sets(data, sets or [])
    return Study(data, source=str(path))
