"""The settings each stage of a run was made with (stages.json in the run folder).

A rerun keeps a stage's output only when the stage was recorded with exactly the settings it would use
now (its config slice and everything upstream of it). Any other output of a stage, including output
that no stage of the current config makes, moves to `stale/<time>/` in the run folder, and its stage
runs again. Records are written before the stages run, so output that appears later was made under
them; the run folder's lock keeps a second run from writing meanwhile.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from layerprune.common.settings import changed_keys, settings_digest
from layerprune.errors import LayerpruneError
from layerprune.files.outputs import read_json, write_json

RECORD_FILE = "stages.json"
STALE_DIR = "stale"


@dataclass(frozen=True)
class Stage:
    name: str
    settings: dict
    outputs: tuple[str, ...]  # names in the run folder
    step: str = ""  # the function that makes the outputs (runs/steps.py)
    number: int = 0  # which heal stage (1-based), for step "heal"

    @property
    def digest(self) -> str:
        return settings_digest(self.settings)


def settle(run_dir: Path, stages: list[Stage], log: Callable[[str], None]) -> None:
    """Move every stage output not made with the current settings to stale/, then record the settings.

    The outputs looked at are those the current stages write and those the records name: nothing else in
    the run folder is ever moved."""
    records = read_json(run_dir / RECORD_FILE, missing_ok=True) or {}
    owners = {name: stage for stage in stages for name in stage.outputs}
    by_name = {stage.name: stage for stage in stages}
    recorded = {name: stage_name for stage_name, record in records.items() for name in record.get("outputs", [])}
    changes: list[str] = []
    stale: dict[str, list[Path]] = {"changed": [], "unrecorded": [], "orphaned": []}
    for name in sorted(set(owners) | set(recorded)):
        path = run_dir / name
        if not os.path.lexists(path):
            continue
        # e.g. healed-1's work folder of an earlier digest: still healed-1's, made with other settings
        stage = owners.get(name) or by_name.get(recorded.get(name))
        old = records.get(stage.name) if stage is not None else None
        if stage is None:
            stale["orphaned"].append(path)
        elif old is None:
            stale["unrecorded"].append(path)
        elif old.get("digest") != stage.digest or name not in stage.outputs:
            stale["changed"].append(path)
            changes += [c for c in changed_keys(old.get("settings"), stage.settings) if c not in changes]
    if any(stale.values()):
        batch = _stale_batch(run_dir)
        if (run_dir / RECORD_FILE).exists():  # what the moved outputs were made with
            shutil.copy2(run_dir / RECORD_FILE, batch / RECORD_FILE)
        whys = {"changed": f"settings changed ({'; '.join(changes)})",
                "unrecorded": "no record of the settings these were made with",
                "orphaned": "no stage of this config makes these"}
        for kind, paths in stale.items():
            for path in paths:
                if path.is_symlink():  # a study's link to shared work: the shared copy stays for other runs
                    path.unlink()
                else:
                    path.rename(batch / path.name)
            if paths:
                log(f"{whys[kind]}: moved {', '.join(p.name for p in paths)} to {batch.relative_to(run_dir)}/; "
                    "their stages run again")
    write_json(run_dir / RECORD_FILE, {stage.name: {"digest": stage.digest, "settings": stage.settings,
                                                    "outputs": list(stage.outputs)} for stage in stages})


def _stale_batch(run_dir: Path) -> Path:
    if (run_dir / STALE_DIR).is_symlink():  # outputs are moved only within the run folder layerprune claimed
        raise LayerpruneError(f"{run_dir / STALE_DIR} is a symbolic link; layerprune moves earlier outputs only into "
                              "a folder of its own there (remove the link)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        batch = run_dir / STALE_DIR / (stamp if n == 1 else f"{stamp}-{n}")
        try:
            batch.mkdir(parents=True)
            return batch
        except FileExistsError:
            continue
    raise FileExistsError(run_dir / STALE_DIR / stamp)
