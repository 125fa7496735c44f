"""One function per stage of a run (runs/planner.py names them): each makes its stage's outputs in the run
folder from the run's state (`pipeline.Run`: the config, the loaded original, the current model) and sets
`run.current` to the model folder that later stages work on.

Every function skips work whose output exists: the stage ledger (runs/stages.py) has already moved output
made with other settings out of the way, so what remains was made with the current settings. One run at a
time holds the folder (runs/lock.py), so outputs are written with overwrite=True: whatever layerprune
output sits at a stage's path is that stage's own unfinished work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol

from layerprune.api import evaluate_model
from layerprune.benchmark import benchmark, write_outputs
from layerprune.config import RunConfig
from layerprune.data.calibration import VALIDATION_SEED_OFFSET
from layerprune.errors import LayerpruneError
from layerprune.files.outputs import atomic_output_dir, is_main_process, read_json, write_json
from layerprune.files.work_dirs import claim_work_dir, remove_work_dir, removed_unless_used
from layerprune.finetune.stage import heal_model_ref, write_healed
from layerprune.importance import LayerScores, compute_many, get_metric
from layerprune.importance.experts.registry import get_expert_metric
from layerprune.importance.scores_file import read_scores_json, write_scores_json
from layerprune.models.checkpoint import prune_checkpoint
from layerprune.models.experts.surgery import remove_experts
from layerprune.models.loading import LoadedModel, model_folder, resolve_model_ref
from layerprune.models.memory_policy import too_big_to_load
from layerprune.models.saving import save_model
from layerprune.report.rebuild import write_run_report
from layerprune.runs.planner import base_settings, heal_settings, prune_settings, run_inputs, work_dir_name
from layerprune.runs.stages import Stage
from layerprune.selection.curve import curve_for_loaded, write_curve_files
from layerprune.selection.experts import prune_experts
from layerprune.selection.objectives import objective_validation
from layerprune.selection.strategies import PruneHooks, history_entry, iterative_rounds, prune
from layerprune.selection.strategies import choose as choose_drop_set


class Run(Protocol):
    """What a step uses of the run (pipeline.Run)."""

    config: RunConfig
    dir: Path
    log: Callable[[str], None]
    shared_dir: Path | None
    original: LoadedModel
    current: str  # the model folder the next stage works on
    summary: dict

    def path(self, name: str) -> Path: ...
    def shared_path(self, name: str, key: dict) -> Path: ...
    def expose(self, name: str, target: Path) -> None: ...
    def load(self, ref: str, tokenizer_from: LoadedModel | None = None, *, saved: bool = False,
             dtype: str | None = None) -> LoadedModel: ...
    def final(self) -> LoadedModel: ...
    def calibration(self, tokenizer, seed_offset: int = 0): ...


def evaluate_step(run: Run, stage: Stage) -> None:
    """eval-original, eval-pruned (shared in a study: they depend on nothing a setting heals) or eval-final."""
    if stage.name == "eval-original":
        evaluate(run, stage.name, run.original, key=stage.settings)
    elif stage.name == "eval-pruned":
        evaluate(run, stage.name, run.load(str(run.path("pruned")), run.original), key=stage.settings,
                 reference=run.original.model)
    else:
        evaluate(run, stage.name, run.final(), reference=run.original.model)


def evaluate(run: Run, name: str, loaded: LoadedModel, key: dict | None = None, reference=None) -> dict:
    """The eval folder `name` (eval.json, samples): made once, in the study's shared folder when keyed."""
    out = run.shared_path(name, key) if key is not None else run.path(name)
    if (out / "eval.json").exists():
        run.expose(name, out)
        return read_json(out / "eval.json")
    run.log(f"evaluating {name}")
    # reference: the original, which instruction following compares with
    # the run's plan estimated this stage already: no second timed forward
    result = evaluate_model(loaded, run.config.eval, out=out, reference=reference, overwrite=True, estimate=False,
                            log=run.log)
    run.expose(name, out)
    return result.record


def curve_step(run: Run, stage: Stage) -> None:
    """The trade-off curve of the unpruned model (selection/curve.py): curve/curve.json, .csv and .png."""
    if (run.path("curve") / "curve.json").exists():
        return
    run.log("tracing the trade-off curve")
    write_curve_files(run.path("curve"), curve_for_loaded(run.original, run.config.curve, log=run.log),
                      overwrite=True)


def prune_step(run: Run, stage: Stage) -> None:
    """Choose on the original (scores cached in scores.json), cut a copy loaded as stored, save it."""
    selection, pruned_dir = run.path("selection.json"), run.path("pruned")
    if run.shared_dir is not None:  # a study: selection and pruned model live in the shared folder
        where = run.shared_path("prune", stage.settings)
        selection, pruned_dir = where / "selection.json", where / "pruned"
    folder = on_disk_source(run)
    if pruned_dir.is_dir():
        run.log("pruned model exists: skipping score/select/prune")
    elif folder is not None and run.config.prune.prunes_experts:
        raise LayerpruneError("a run removes experts from the model in memory, and this one does not fit twice; "
                              "remove them with `layerprune prune --no-load --drop-experts ...`, then run on its output")
    elif folder is not None:
        record = read_json(selection, missing_ok=True) or choose(run, run.original)
        prune_checkpoint(folder, record["dropped"], pruned_dir, overwrite=True, how=history_entry(record),
                         source=run.config.model)
        write_json(selection, record)
        run.log(f"pruned original layers {record['dropped']} ({record['chosen_by']}) on disk")
    else:
        pruned = run.load(run.config.model, saved=True)
        config = run.config.prune

        def select(number, model, n_drop):
            cached = read_json(selection, missing_ok=True)
            if cached is not None:
                return cached
            return choose(run, run.original) if config.prunes_layers else {"dropped": [], "chosen_by": "none"}

        def saved(number, model, record):
            if config.prunes_experts:  # after the layers: experts scored on the model that remains
                record = {**record, "experts": experts_step(run, model, pruned.tokenizer, record.get("experts"))}
            write_json(selection, record)  # only once it applied: a selection that fails must not be reused
            save_model(model, pruned.tokenizer, pruned_dir, overwrite=True, extra={"selection": record})
            granularity = run.config.prune.granularity  # block, or attention/MLP only (models/sublayer.py)
            what = "pruned" if granularity == "block" else f"removed the {granularity} of"
            if record["dropped"]:
                run.log(f"{what} original layers {record['dropped']} ({record['chosen_by']})")

        prune(pruned.model, run.config.prune, PruneHooks(select=select, saved=saved), log=run.log)
    run.expose("selection.json", selection)
    run.expose("pruned", pruned_dir)
    run.current = str(run.path("pruned"))


def experts_step(run: Run, model, tokenizer, cached: dict | None) -> dict:
    """Remove the experts the run's prune config asks for (selection/experts.py), or those a cached selection
    recorded; the record."""
    if cached is not None:
        remove_experts(model, {int(layer): experts for layer, experts in cached["dropped"].items()},
                       how={"chosen_by": cached["chosen_by"]})
        return cached
    config = run.config.prune
    reads_text = config.drop_experts is None and get_expert_metric(config.expert_metric).needs_calibration
    return prune_experts(model, config, run.calibration(tokenizer) if reads_text else None, run.log)


def on_disk_source(run: Run) -> Path | None:
    """The local checkpoint folder to cut on disk, when a second copy of the model (the one to prune, kept
    in its stored dtype beside the loaded original) would not fit in memory; None to prune in memory."""
    if run.config.prune.granularity != "block" or resolve_model_ref(run.config.model).kind == "hub":
        return None
    folder = model_folder(run.config.model)
    over = too_big_to_load(folder)
    if over is None:
        return None
    run.log(f"the weights ({over[0] / 2**30:.1f} GiB) do not fit twice in the available memory "
            f"({over[1] / 2**30:.1f} GiB): the pruned model is cut from the checkpoint on disk")
    return Path(folder)


def heal_step(run: Run, stage: Stage) -> None:
    """Heal stage `stage.number` on the previous stage's output."""
    run.current = heal(run, stage.number, run.current, run.path(stage.name), base=prune_settings(run.config))


def heal(run: Run, number: int, ref: str, out: Path, *, base: dict) -> str:
    """Heal `ref` with heal stage `number` into `out` (skipped when it exists); returns the model folder.

    base: the settings `ref` depends on. The checkpoints live in a work folder named by the digest of the
    stage's settings, so an interrupted heal only ever resumes under the same settings."""
    if out.is_dir():
        run.log(f"{out.name} exists: skipping")
        return str(out)
    config = run.config.heal[number - 1]
    loaded = {}

    def load(dtype):  # as late as possible: a teacher pass that can run first runs with the teacher alone
        loaded["model"] = run.load(ref, run.original, saved=True, dtype=dtype)
        return loaded["model"]

    run.log(f"healing with {config.method} ({out.name})")
    settings = heal_settings(run.config, base, number)
    work = out.with_name(work_dir_name(out.name, settings))
    resume = work.exists()
    if is_main_process():  # claimed like an output: only a folder layerprune made is resumed or deleted
        resume = claim_work_dir(work, settings, inputs=run_inputs(run.config), resume=True, option="resume")
    with removed_unless_used(work):
        result, record = heal_model_ref(ref, config, load=load, tokenizer=run.original.tokenizer,
                                        default_teacher=run.config.model, work_dir=work, resume=resume, log=run.log)
    if is_main_process():  # under accelerate/torchrun only the main process writes
        write_healed(result, record, loaded["model"].tokenizer, out, overwrite=True)
        remove_work_dir(work)
    return str(out)


def rounds_step(run: Run, stage: Stage) -> None:
    """Score -> drop `step` layers -> heal, until `total` are gone; each round is a folder
    (rounds/round-N: scores.json, selection.json, pruned/, healed-*/, done.json) and resumes from it."""
    original = run.original
    rounds = len(iterative_rounds(run.config.prune))

    def round_dir(number: int) -> Path:
        return run.path(f"rounds/round-{number}")

    def finished(number: int) -> dict | None:
        done = read_json(round_dir(number) / "done.json", missing_ok=True)
        return read_json(round_dir(number) / "selection.json") if done else None

    def reload(number: int):
        ref = read_json(round_dir(number) / "done.json")["model"] if number else run.config.model
        return run.load(ref, original, saved=True).model

    def select(number, model, n_drop):
        round_dir(number).mkdir(parents=True, exist_ok=True)
        current = LoadedModel(model=model, tokenizer=original.tokenizer, ref="", path="")
        return read_json(round_dir(number) / "selection.json", missing_ok=True) or \
            choose(run, current, n_drop, scores_name=f"rounds/round-{number}/scores.json")

    def saved(number, model, record):
        write_json(round_dir(number) / "selection.json", record)  # only once it applied
        save_model(model, original.tokenizer, round_dir(number) / "pruned", overwrite=True,
                   extra={"selection": record})

    def heal_round(model, number):
        ref = str(round_dir(number) / "pruned")
        base = {**prune_settings(run.config), "round": number}
        for stage_number in range(1, len(run.config.heal) + 1):
            ref = heal(run, stage_number, ref, round_dir(number) / f"healed-{stage_number}", base=base)
        selection = read_json(round_dir(number) / "selection.json")
        write_json(round_dir(number) / "done.json", {"model": ref, "dropped": selection["dropped"]})
        return run.load(ref, original, saved=True).model if number < rounds else None  # the last: read later

    prune(None, run.config.prune, PruneHooks(select=select, finished=finished, reload=reload, saved=saved,
                                             heal=heal_round), log=run.log)
    run.current = read_json(round_dir(rounds) / "done.json")["model"]


def choose(run: Run, loaded: LoadedModel, n_drop: int | None = None, scores_name: str = "scores.json") -> dict:
    """The selection record (strategies.choose), with every metric's scores cached in `scores_name`."""
    scores_path = run.path(scores_name)

    def cached_scores(requests: dict[str, dict]) -> dict:
        if scores_path.exists():
            return read_scores_json(scores_path)[0]
        scores = metric_scores(run, loaded, requests, share=scores_name == "scores.json")
        write_scores_json(scores_path, run.config.model, scores)
        return scores

    validation = objective_validation(run.config.prune, loaded.tokenizer, held_out_text=lambda: run.calibration(
        loaded.tokenizer, seed_offset=VALIDATION_SEED_OFFSET))
    return choose_drop_set(loaded.model, run.config.prune, score=cached_scores, n_drop=n_drop, log=run.log,
                           validation=validation)


def metric_scores(run: Run, loaded: LoadedModel, requests: dict[str, dict], share: bool) -> dict:
    """Scores of each requested metric; in a study, each metric's scores are computed once and shared."""
    text = {**base_settings(run.config), "calibration": run.config.prune.calibration.model_dump(mode="json")}
    paths = {name: run.shared_path(f"scores-{name}.json", {**text, "metric": name, "params": params})
             for name, params in requests.items()} if share and run.shared_dir else {}
    found = {n: LayerScores.from_json(read_json(p)) for n, p in paths.items() if p.exists()}
    missing = {n: params for n, params in requests.items() if n not in found}
    if missing:
        calibration = None
        if any(get_metric(n).needs_calibration for n in missing):
            calibration = run.calibration(loaded.tokenizer)
        for name, scores in compute_many(loaded.model, missing, calibration).items():
            found[name] = scores
            if name in paths:
                write_json(paths[name], scores.to_json())
    return {name: found[name] for name in requests}


def bench_step(run: Run, stage: Stage) -> None:
    out = run.path("bench")
    if (out / "bench.json").exists():
        return
    config, original, final = run.config.bench, run.original, run.final()
    run.log("benchmarking original vs final")
    base = benchmark(original.model, original.tokenizer, config, name="original")
    other = benchmark(final.model, final.tokenizer, config, name="final")
    with atomic_output_dir(out, overwrite=True) as tmp:
        write_outputs(tmp, base, other)


def report_step(run: Run, stage: Stage) -> None:
    run.summary, _ = write_run_report(run.dir, run.current)


STEPS = {"evaluate": evaluate_step, "curve": curve_step, "prune": prune_step, "rounds": rounds_step,
         "heal": heal_step, "bench": bench_step, "report": report_step}
