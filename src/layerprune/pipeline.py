"""One run: score -> select -> prune -> heal -> eval -> bench -> report, each stage a file in the run folder.

A stage whose output exists is skipped, so an interrupted run resumes where it stopped (an
iterative schedule resumes from its last finished round). Every number in report.md comes from a
file next to it.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from layerprune.config import RunConfig
from layerprune.errors import LayerpruneError
from layerprune.importance import compute_many, get_metric
from layerprune.models.loading import LoadedModel, load_model
from layerprune.models.saving import package_versions, save_model
from layerprune.models.surgery import bypass_layers, kept_layers, remove_layers
from layerprune.outputs import write_json
from layerprune.selection import count_to_drop, select_layers

Log = Callable[[str], None]


def _read(path: Path):
    return json.loads(path.read_text())


class Run:
    def __init__(self, config: RunConfig, log: Log = print):
        self.config = config
        self.dir = Path(config.out)
        self.log = log

    # ------------------------------------------------------------------ helpers
    def path(self, name: str) -> Path:
        return self.dir / name

    def load(self, ref: str, tokenizer_from: LoadedModel | None = None) -> LoadedModel:
        loaded = load_model(ref, dtype=self.config.dtype)
        if loaded.tokenizer is None and tokenizer_from is not None:
            loaded.tokenizer = tokenizer_from.tokenizer
        return loaded

    def calibration(self, tokenizer, seed_offset: int = 0):
        from layerprune.data.calibration import load_calibration

        c = self.config.calibration
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
            self.evaluate("eval-original", original)
        if self.config.prune.strategy == "iterative":
            final_ref = self.iterative(original)
        else:
            self.one_shot(original)
            if self.config.eval and self.config.eval.before_healing and self.config.heal:
                self.evaluate("eval-pruned", self.load(str(self.path("pruned")), original))
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
        if self.path("pruned").is_dir():
            self.log("pruned model exists: skipping score/select/prune")
            return
        model = original.model
        selection = self.path("selection.json")
        if not selection.exists():
            write_json(selection, self.choose(original, self.n_drop(model)))
        record = _read(selection)
        pruned = self.load(self.config.model)
        remove_layers(pruned.model, record["dropped"], how={"chosen_by": record["chosen_by"]})
        save_model(pruned.model, pruned.tokenizer, self.path("pruned"), extra={"selection": record})
        self.log(f"pruned original layers {record['dropped']} ({record['chosen_by']})")

    def n_drop(self, model) -> int:
        prune = self.config.prune
        if prune.drop is not None:
            return len(prune.drop)
        return count_to_drop(len(kept_layers(model)), num_layers=prune.num_layers, ratio=prune.ratio)

    def choose(self, loaded: LoadedModel, n_drop: int, scores_name: str = "scores.json") -> dict:
        """Score (once per metric, cached in scores.json) and select; select: auto compares candidates."""
        from layerprune.importance import LayerScores
        from layerprune.scoring import metric_requests

        prune = self.config.prune
        if prune.drop is not None:
            return {"dropped": sorted(prune.drop), "chosen_by": "explicit"}
        model = loaded.model
        scores_path = self.path(scores_name)
        n_layers = len(kept_layers(model))
        requests = metric_requests(prune.metrics, n_layers, seed=self.config.seed, block_size=n_drop)
        for name, params in prune.metric_params.items():
            requests.setdefault(name, {}).update(params)
        if scores_path.exists():
            cached = {n: LayerScores.from_json(s) for n, s in _read(scores_path).items()}
        else:
            calibration = None
            if any(get_metric(n).needs_calibration for n in prune.metrics):
                calibration = self.calibration(loaded.tokenizer)
            cached = compute_many(model, requests, calibration)
            write_json(scores_path, {n: s.to_json() for n, s in cached.items()})
        candidates = {}
        for name, scores in cached.items():
            k = int(scores.params["block_size"]) if scores.params.get("block_size") else n_drop
            candidates[name] = select_layers(scores, num_layers=k, protect_first=prune.protect_first,
                                             protect_last=prune.protect_last).dropped
        if prune.select == "metric":
            name = prune.metrics[0]
            return {"dropped": candidates[name], "chosen_by": name}
        validation = self.calibration(loaded.tokenizer, seed_offset=1000)
        losses = {name: validation_loss(model, validation, drop) for name, drop in candidates.items()}
        best = min(losses, key=lambda n: (losses[n], n))
        self.log("validation loss of each candidate: " + ", ".join(f"{n} {v:.3f}" for n, v in losses.items()))
        return {"dropped": candidates[best], "chosen_by": f"auto:{best}",
                "candidates": {n: {"dropped": candidates[n], "validation_loss": losses[n]} for n in candidates}}

    def heal_chain(self, ref: str, tokenizer_from: LoadedModel, prefix: str = "healed") -> str:
        """Run each heal stage in order on the previous stage's output; returns the final model folder."""
        from layerprune.api import prepare_training_rows
        from layerprune.data.instructions import FieldMap
        from layerprune.finetune import HealConfig, heal
        from layerprune.finetune.trainer import write_loss_curve
        from layerprune.models.saving import write_model_files
        from layerprune.outputs import atomic_output_dir

        for number, stage in enumerate(self.config.heal, 1):
            out = self.path(f"{prefix}-{number}")
            if out.is_dir():
                self.log(f"{out.name} exists: skipping")
                ref = str(out)
                continue
            loaded = self.load(ref, tokenizer_from)
            heal_config = HealConfig(**stage.model_dump(include=set(HealConfig.model_fields)))
            rows, data_info = prepare_training_rows(
                stage.method, loaded.tokenizer, stage.data, heal_config, max_samples=stage.max_samples,
                fields=FieldMap.parse(stage.fields) if stage.fields else None, template=stage.template,
                seed=heal_config.seed,
            )
            teacher = None
            if stage.method == "distill":
                teacher = load_model(stage.teacher or self.config.model, dtype=self.config.dtype,
                                     load_tokenizer=False).model
            self.log(f"healing with {stage.method} on {data_info['source']} ({len(rows)} sequences)")
            work = self.path(f".{out.name}.checkpoints")
            result = heal(loaded.model, rows, heal_config, tokenizer=loaded.tokenizer, teacher=teacher,
                          work_dir=work, resume=work.exists())
            record = {**result.summary(), "config": heal_config.model_dump(), "data": data_info}
            with atomic_output_dir(out) as tmp:
                write_model_files(result.model, loaded.tokenizer, tmp, extra={"heal": record})
                write_json(tmp / "heal.json", record)
                write_loss_curve(result.loss_curve, tmp)
            shutil.rmtree(work, ignore_errors=True)
            ref = str(out)
        return ref

    def iterative(self, original: LoadedModel) -> str:
        """Score -> drop `step` layers -> heal, until `total` are gone; each round is a folder."""
        step, total = self.config.prune.parsed_schedule()
        ref = self.config.model
        rounds = total // step
        for r in range(1, rounds + 1):
            round_dir = self.path(f"rounds/round-{r}")
            if (round_dir / "done.json").exists():
                ref = _read(round_dir / "done.json")["model"]
                continue
            round_dir.mkdir(parents=True, exist_ok=True)
            current = self.load(ref, original)
            selection = round_dir / "selection.json"
            if not selection.exists():
                write_json(selection, self.choose(current, step, scores_name=f"rounds/round-{r}/scores.json"))
            record = _read(selection)
            pruned_dir = round_dir / "pruned"
            if not pruned_dir.is_dir():
                remove_layers(current.model, record["dropped"], how={"chosen_by": record["chosen_by"], "round": r})
                save_model(current.model, current.tokenizer, pruned_dir)
            self.log(f"round {r}/{rounds}: dropped original layers {record['dropped']}")
            ref = self.heal_chain(str(pruned_dir), original, prefix=f"rounds/round-{r}/healed")
            write_json(round_dir / "done.json", {"model": ref, "dropped": record["dropped"]})
        return ref

    def evaluate(self, name: str, loaded: LoadedModel) -> dict:
        from layerprune.evaluation.run import plan_eval, run_eval, write_eval

        out = self.path(name)
        if (out / "eval.json").exists():
            return _read(out / "eval.json")
        e = self.config.eval
        plan = plan_eval(tasks=e.tasks, ppl=e.ppl, seq_len=e.seq_len, ppl_windows=e.ppl_windows, limit=e.limit,
                         batch_size=e.batch_size, samples=e.samples)
        self.log(f"evaluating {name}")
        result = run_eval(loaded, plan)
        write_eval(out, result, plan)
        return result.record

    def benchmark(self, original: LoadedModel, final: LoadedModel) -> None:
        from layerprune.benchmark import BenchConfig, benchmark, write_outputs

        out = self.path("bench")
        if (out / "bench.json").exists():
            return
        b = self.config.bench
        config = BenchConfig(seq_len=b.seq_len, batch_sizes=b.batch_sizes, new_tokens=b.new_tokens,
                             warmup=b.warmup, runs=b.runs).validate()
        self.log("benchmarking original vs final")
        base = benchmark(original.model, original.tokenizer, config, name="original")
        other = benchmark(final.model, final.tokenizer, config, name="final")
        out.mkdir(parents=True, exist_ok=True)
        write_outputs(out, base, other)

    def report(self, final_ref: str) -> dict:
        from layerprune.report.run_report import run_report

        text, summary = run_report(self.dir, final_ref)
        (self.dir / "report.md").write_text(text)
        return summary


@torch.no_grad()
def validation_loss(model, calibration, drop: list[int]) -> float:
    """Mean next-token loss of the model with the ORIGINAL layers `drop` bypassed (nothing is copied)."""
    positions = [kept_layers(model).index(i) for i in drop]
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with bypass_layers(model, positions):
        for ids, mask in calibration.batches(4):
            ids, mask = ids.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
            target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((target != -100).sum())
    if count == 0:
        raise LayerpruneError("validation data has no tokens")
    return total / count


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def run_pipeline(config: RunConfig, log: Log = print) -> dict:
    return Run(config, log).execute()
