"""Run one healing method with the transformers Trainer; distillation adds a teacher term to the loss."""

from __future__ import annotations

import csv
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerprune.common.units import format_seconds as format_minutes
from layerprune.data.collate import PadCollator, TokenizedDataset  # noqa: F401  (PadCollator: public here)
from layerprune.errors import LayerpruneError
from layerprune.files.cache import cache_dir
from layerprune.files.plotting import pyplot
from layerprune.files.user_files import check_free_space, disk_full_message
from layerprune.finetune.budget import plan_steps
from layerprune.finetune.config import HealConfig
from layerprune.finetune.finite import check_finite_weights, check_loss, finite_guard
from layerprune.finetune.hidden_states import StateRecorder, cut_pairs, relative_state_error
from layerprune.finetune.local import replace_unsupported
from layerprune.finetune.losses import chunked_cross_entropy, chunked_distillation
from layerprune.finetune.methods import HealContext, get_method, heal_compute, trainable_parameters
from layerprune.finetune.placement import on_training_device
from layerprune.finetune.teacher import teacher_targets
from layerprune.finetune.teacher_first import rows_per_step as rows_per_optimizer_step
from layerprune.hardware.compute import announce
from layerprune.hardware.devices import release_memory
from layerprune.models.anatomy import parameter_bytes
from layerprune.models.logits import causal_lm_parts, head_logits, labelled_positions, unwrapped
from layerprune.models.saving import SIDE_FILES_BYTES
from layerprune.models.surgery import provenance
from layerprune.models.tokens import IGNORE_INDEX, pad_token_id


def _trainer_class():
    from transformers import Trainer

    class HealTrainer(Trainer):
        """The Trainer with the loss computed only where labels are, a chunk of logits at a time
        (finetune/losses.py); with a teacher (live, or its cached top-k targets) the loss is distillation."""

        def __init__(self, *args, teacher=None, teacher_targets=None, temperature=2.0, alpha=1.0, top_k=None,
                     chunk=1024, state_layers=(), state_weight=0.0, **kwargs):
            super().__init__(*args, **kwargs)
            self.teacher, self.teacher_targets = teacher, teacher_targets
            self.temperature, self.alpha, self.top_k, self.chunk = temperature, alpha, top_k, chunk
            self.state_weight = state_weight
            # distill_hidden: the student's states at the cuts, toward the teacher's cached ones
            self.recorder = StateRecorder(unwrapped(self.model), list(state_layers)) if state_layers else None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            _, head, softcap = causal_lm_parts(model)
            ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
            hidden, targets = labelled_positions(model, ids, mask, labels)
            topk = self._teacher_topk(inputs)
            if topk is None:
                total = chunked_cross_entropy(head, hidden, targets, softcap=softcap, chunk=self.chunk)
            else:
                total = chunked_distillation(head, hidden, targets, topk, temperature=self.temperature,
                                             alpha=self.alpha, softcap=softcap, chunk=self.chunk)
            if self.recorder is not None:
                teacher_states = self.teacher_targets.states_for_rows(inputs["row"].tolist()).to(hidden.device)
                total = total + self.state_weight * relative_state_error(self.recorder.at_labels(labels),
                                                                         teacher_states)
            # like the stock causal-LM loss: the sum over the accumulated batch's label tokens, or the mean
            count = num_items_in_batch if num_items_in_batch is not None else max(len(targets), 1)
            loss = total / count
            if model.training:  # a diverged heal stops here, at the step it happened
                check_loss(loss, self.state.global_step + 1, self.args.learning_rate)
            return (loss, None) if return_outputs else loss

        def _teacher_topk(self, inputs):
            """teacher_topk(start, stop) -> (values, indices) for the batch's labelled positions, or None."""
            if self.teacher_targets is not None:
                values, indices = self.teacher_targets.for_rows(inputs["row"].tolist())
                device = inputs["input_ids"].device
                return lambda start, stop: (values[start:stop].to(device), indices[start:stop].to(device))
            if self.teacher is None:
                return None
            _, t_head, t_softcap = causal_lm_parts(self.teacher)
            with torch.no_grad():
                t_hidden, _ = labelled_positions(self.teacher, inputs["input_ids"], inputs["attention_mask"],
                                                 inputs["labels"])

            def live(start, stop):
                with torch.no_grad():
                    logits = head_logits(t_head, t_hidden[start:stop], t_softcap)
                if self.top_k is None:
                    return logits, None
                top = logits.topk(self.top_k, dim=-1)
                return top.values, top.indices

            return live

    return HealTrainer


@dataclass
class HealResult:
    model: object
    method: str
    trainable_params: int
    total_params: int
    steps: int
    tokens_seen: int
    seconds: float
    final_loss: float | None
    loss_curve: list[dict] = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("model", "loss_curve")}


@dataclass
class _Prepared:
    """What the steps of `heal` hand each other, once the method, the teacher and the compute are settled."""

    method: object  # methods.HealMethod
    model: object  # the model to train (a peft model, a quantized copy, ... after method.prepare)
    rows: list[dict]
    config: HealConfig  # max_steps fitted to the budget once planned
    context: HealContext
    compute: object  # hardware.compute.ComputeChoice, decided once the model is where it trains
    started: float  # perf_counter when heal began: the budget counts from there
    teacher: object = None  # the model distillation reads live (None once its targets are cached)
    targets: object = None  # the teacher's cached top-k targets
    pairs: list = field(default_factory=list)  # (student, teacher) layers of the hidden-state loss
    accumulation: int = 1
    rows_per_step: int = 1
    deadline: object = None  # budget.budget_callback when max_minutes is set
    trainable: int = 0
    total: int = 0


def heal(
    model,
    rows: list[dict],
    config: HealConfig,
    *,
    tokenizer=None,
    teacher=None,
    targets=None,
    work_dir: str | os.PathLike | None = None,
    resume: bool = False,
    log=print,
) -> HealResult:
    """Fine-tune `model` on tokenized rows ({input_ids, labels}) with one method; returns a stock model.

    teacher: the unpruned model, or a function that loads it (then nothing outside holds it, and once its
    top-k targets are cached it is freed before training: the peak is the student's, not both).
    targets: (TeacherTargets, notes) made before the student was loaded (finetune/teacher_first.py): the
    teacher's top-k targets of the first rows; training reads only those rows and needs no teacher.

    work_dir holds Trainer checkpoints (resume picks up the last one). Under `accelerate launch`
    the Trainer runs data-parallel (DDP/FSDP) with no change here. Before training, one timed step gives
    the estimate printed through `log`, and fits the steps into `config.max_minutes` when set (budget.py).
    Four steps: prepare (method, teacher), plan (the model on the device it trains on and the compute there, the
    method's trainable model, the timed step and the budget, the teacher's targets), train (the Trainer), finish
    (the stock model and its record).
    """
    prepared = _prepare(model, rows, config, tokenizer=tokenizer, teacher=teacher, targets=targets)
    if prepared.method.run is not None:  # a procedure of its own (e.g. training-free replacement), not the Trainer
        _decide_compute(prepared)
        return _run_procedure(prepared.method, prepared.model, prepared.rows, prepared.config, prepared.context)
    _plan(prepared, log)
    work_dir = Path(work_dir or Path.cwd() / "heal-checkpoints")
    check_checkpoint_space(prepared, work_dir, resume)
    trainer, output, seconds = _train_prepared(prepared, work_dir, resume)
    return _finish(prepared, trainer, output, seconds)


def _prepare(model, rows, config, *, tokenizer, teacher, targets) -> _Prepared:
    """Check the inputs, settle the teacher (targets made before the student loaded, or a loader called now),
    and seed."""
    from transformers import set_seed  # heavy: transformers' training utilities import peft, accelerate

    if not rows:
        raise LayerpruneError("no training examples")
    method = get_method(config.method)
    started = time.perf_counter()
    notes = {}
    if targets is not None:  # the teacher pass already ran, with the teacher alone in memory
        targets, notes["teacher_targets"] = targets
        rows, teacher = rows[:len(targets.offsets) - 1], None
    elif callable(teacher) and not isinstance(teacher, torch.nn.Module):  # a loader: nothing else holds the model
        teacher = teacher()
    if method.needs_teacher and teacher is None and targets is None:
        raise LayerpruneError(f"{config.method} needs a teacher model (the unpruned model)")
    set_seed(config.seed)
    context = HealContext(tokenizer=tokenizer, teacher=teacher, notes=notes)
    rows_per_step = rows_per_optimizer_step(config)
    return _Prepared(method, model, rows, config, context, None, started, teacher=teacher, targets=targets,
                     rows_per_step=rows_per_step,
                     accumulation=rows_per_step // (config.batch_size * int(os.environ.get("WORLD_SIZE", "1"))))


def _plan(p: _Prepared, log) -> None:
    """Replace the cuts first (init replace), move the model where the Trainer trains it and decide the compute
    there, make the method's trainable model, time one step and fit the steps to the budget, then cache the
    teacher's targets of the rows those steps read and free the teacher."""
    if p.config.init == "replace" and provenance(p.model)["dropped_layers"]:  # an unpruned model has no cut
        p.model = _replace_first(p.model, p.rows, p.config, p.context)
    p.model = on_training_device(p.model, p.config)  # a GPU's: the method and the timed step see where it trains
    _decide_compute(p)
    p.pairs = _state_pairs(p.model, p.config, p.context)
    # Only a distilling method trains toward the teacher's logits; others get the teacher for init replace only.
    distill_from = p.teacher if p.method.distills else None
    cached_targets = distill_from is not None and p.config.distill_top_k is not None
    p.model = p.method.prepare(p.model, p.config, p.context)
    p.trainable, p.total = trainable_parameters(p.model)
    p.config, p.deadline = _plan_steps(p.model, p.rows, p.config, p.context, p.compute, started=p.started,
                                       accumulation=p.accumulation, rows_per_step=p.rows_per_step,
                                       teacher=distill_from if cached_targets else None, log=log)
    p.teacher = distill_from
    if p.targets is None and cached_targets:
        if p.config.max_steps > 0:  # the teacher reads only what the steps will use: one pass over the first rows
            p.rows = p.rows[:p.config.max_steps * p.rows_per_step]
        p.targets = _cached_teacher_targets(distill_from, p.rows, p.config, p.context.tokenizer, p.context,
                                            heal_compute(distill_from, p.config),  # on the teacher's device
                                            state_layers=[t for _, t in p.pairs])
        p.teacher = p.context.teacher = distill_from = None  # its targets are on disk: free it before training
        release_memory()
    if p.pairs and (p.targets is None or p.targets.states is None):  # a teacher read layer by layer: logits only
        p.context.notes["hidden_states"]["skipped"] = "the teacher's states were not recorded (streamed)"
        p.pairs = []


def _decide_compute(p: _Prepared) -> None:
    """How healing computes on the device the model is on (hardware.compute), said once and kept in the notes."""
    p.compute = heal_compute(p.model, p.config)
    announce(p.compute)
    p.context.notes["compute"] = p.compute.to_json()


def check_checkpoint_space(p: _Prepared, work_dir: Path, resume: bool) -> None:
    """With save_steps, the Trainer keeps every checkpoint it saves: each holds the trained model's weights (the
    adapters alone under LoRA/QLoRA), AdamW's two states per trainable weight and small files. Refused before the
    first step when the ones still to come do not fit on the disk of the work folder."""
    config = p.config
    if not config.save_steps:
        return
    steps = config.max_steps if config.max_steps > 0 else math.ceil(config.epochs * len(p.rows) / p.rows_per_step)
    done = 0
    last = _last_checkpoint(work_dir) if resume else None
    if last is not None and Path(last).name.rpartition("-")[2].isdigit():
        done = int(Path(last).name.rpartition("-")[2])
    saves = steps // config.save_steps - done // config.save_steps
    if saves <= 0:
        return
    trainable = sum(t.numel() * t.element_size() for t in p.model.parameters() if t.requires_grad)
    weights = trainable if hasattr(p.model, "peft_config") else parameter_bytes(p.model)
    check_free_space(work_dir, saves * (weights + 2 * trainable + SIDE_FILES_BYTES),
                     f"{saves} checkpoints of healing (one every {config.save_steps} steps)")


def _train_prepared(p: _Prepared, work_dir: Path, resume: bool):
    """Run the Trainer over the planned steps: (trainer, its output, seconds)."""
    config = p.config
    trainer = _trainer_class()(
        model=p.model,
        args=_training_arguments(config, work_dir, p.compute, p.accumulation),
        train_dataset=TokenizedDataset(p.rows),
        data_collator=PadCollator(pad_token_id(p.context.tokenizer)),
        teacher=p.teacher if p.targets is None else None,
        teacher_targets=p.targets,
        temperature=config.distill_temperature,
        alpha=config.distill_alpha,
        top_k=config.distill_top_k,
        chunk=config.loss_chunk,
        state_layers=[s for s, _ in p.pairs] if p.targets is not None else [],
        state_weight=config.hidden_weight,
        callbacks=[finite_guard(config.learning_rate), *([p.deadline] if p.deadline is not None else [])],
    )
    if p.deadline is not None:
        from transformers import ProgressCallback  # heavy: see _prepare

        bars = [c for c in trainer.callback_handler.callbacks if isinstance(c, ProgressCallback)]
        p.deadline.progress = bars[0] if bars else None
    if p.teacher is not None:
        p.teacher.eval().requires_grad_(False)
    start = time.perf_counter()
    output = _train(trainer, _last_checkpoint(work_dir) if resume else None, work_dir)
    if trainer.recorder is not None:
        trainer.recorder.remove()  # the healed model carries no hooks
    _close_process_group_at_exit()
    return trainer, output, time.perf_counter() - start


def _finish(p: _Prepared, trainer, output, seconds: float) -> HealResult:
    """The stock model back from the method (merged, untied as trained), checked finite, and its record."""
    curve = [
        {"step": e["step"], "loss": e["loss"], "learning_rate": e.get("learning_rate"), "grad_norm": e.get("grad_norm")}
        for e in trainer.state.log_history
        if "loss" in e
    ]
    notes = p.context.notes
    if p.deadline is not None:
        notes["time_budget"]["stopped_early"] = p.deadline.stopped_early
        notes["time_budget"]["refitted_to"] = p.deadline.refitted_to  # steps at the real pace
    notes["estimate"]["took_seconds"] = round(time.perf_counter() - p.started, 1)  # teacher pass included
    final = p.method.finalize(p.model, p.config, p.context)
    final.eval()
    check_finite_weights(final)
    tokens = sum(sum(1 for label in r["labels"] if label != IGNORE_INDEX) for r in p.rows)
    epochs_done = trainer.state.epoch or 0
    return HealResult(
        model=final,
        method=p.config.method,
        trainable_params=p.trainable,
        total_params=p.total,
        steps=trainer.state.global_step,
        tokens_seen=int(tokens * epochs_done) if p.config.max_steps < 0 else _tokens_in_steps(p.rows, trainer,
                                                                                              p.accumulation),
        seconds=seconds,
        final_loss=curve[-1]["loss"] if curve else output.training_loss,
        loss_curve=curve,
        notes={**notes, "gradient_accumulation": p.accumulation},
    )


def _state_pairs(model, config, context) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs of the hidden-state loss at the cuts (none when it is off)."""
    if not config.hidden_weight:
        return []
    record = provenance(model)
    pairs = cut_pairs(record["dropped_layers"], record["kept_layers"])
    context.notes["hidden_states"] = {"weight": config.hidden_weight, "student_teacher_layers": pairs}
    return pairs


def _training_arguments(config, work_dir: Path, compute, accumulation: int):
    """The Trainer's arguments of a healing config, computing as hardware.compute decided."""
    from transformers import TrainingArguments  # heavy: see _prepare

    return TrainingArguments(
        output_dir=str(work_dir),
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=accumulation,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.scheduler,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        optim="adamw_torch_fused",  # one fused kernel: ~0.1 s less per step than foreach on 2 CPU cores (SmolLM2 partial)
        # qlora computes in the 4-bit layers' own compute dtype (methods.QLora), so no autocast on top
        bf16=compute.dtype == "bf16" and config.method != "qlora",
        fp16=compute.dtype == "fp16" and compute.device == "cuda" and config.method != "qlora",
        activation_checkpointing=config.gradient_checkpointing,  # transformers 5's name for gradient checkpointing
        logging_steps=config.logging_steps,
        save_strategy="steps" if config.save_steps else "no",
        save_steps=config.save_steps or 500,
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        use_cpu=not torch.cuda.is_available(),
    )


def _plan_steps(model, rows, config, context, compute, *, started, accumulation, rows_per_step, teacher, log):
    """The steps to run (budget.plan_steps: a timed step, fitted to max_minutes), said before training and kept
    in the notes. Returns (config with the steps to run, a deadline callback or None)."""
    distills = get_method(config.method).distills and config.distill_top_k is not None
    plan = plan_steps(model, rows, config, compute=compute, pad_id=pad_token_id(context.tokenizer), started=started,
                      accumulation=accumulation, rows_per_step=rows_per_step, teacher=teacher,
                      distill=(config.distill_alpha, config.distill_temperature, config.distill_top_k)
                      if distills else None)
    if plan.deadline is not None:
        context.notes["time_budget"] = {"minutes": config.max_minutes, "steps_wanted": plan.wanted,
                                        "steps_planned": plan.steps}
    probe = plan.probe
    context.notes["estimate"] = {"seconds": round(plan.estimate_s, 1), "step_seconds": round(probe.step_seconds, 3),
                                 "teacher_row_seconds": round(probe.teacher_row_seconds, 4)}
    teacher_part = (f" + teacher top-{config.distill_top_k} pass over {plan.teacher_rows} rows "
                    f"({format_minutes(plan.teacher_rows * probe.teacher_row_seconds)}, unless cached)"
                    ) if plan.teacher_rows else ""
    budget_part = f", fitted to a {config.max_minutes:.3g}-minute budget (of {plan.wanted} wanted)" \
        if plan.deadline else ""
    log(f"healing plan: {plan.steps} steps x {format_minutes(probe.step_seconds)}{teacher_part}{budget_part}; "
        f"estimated {format_minutes(plan.estimate_s)} on this machine ({compute.dtype})")
    if plan.steps < plan.wanted:
        config = config.model_copy(update={"max_steps": plan.steps})
    return config, plan.deadline


def _cached_teacher_targets(teacher, rows, config, tokenizer, context, compute, state_layers=()):
    """The teacher's top-k targets of the rows, from the on-disk cache when an earlier run made them."""
    from tqdm.auto import tqdm

    start = time.perf_counter()
    bar = tqdm(total=len(rows), desc=f"teacher top-{config.distill_top_k} targets", unit="row", leave=False)
    try:
        targets, cached = teacher_targets(teacher, rows, config.distill_top_k, pad_id=pad_token_id(tokenizer),
                                          cache_dir=cache_dir() / "teacher", batch_size=config.batch_size,
                                          compute=compute, log=lambda done, total: bar.update(done - bar.n),
                                          state_layers=state_layers)
    finally:
        bar.close()
    context.notes["teacher_targets"] = {"file": targets.key["file"], "k": config.distill_top_k,
                                        "from_cache": cached, "seconds": round(time.perf_counter() - start, 2)}
    return targets


def _replace_first(model, rows, config, context):
    """The training-free linear replacement of every cut, as the starting point of training. Skipped (and
    said so in the notes) without a teacher or for a family whose MLP output cannot take the fold."""
    reason = "no teacher model was given" if context.teacher is None else replace_unsupported(model)
    if reason:
        warnings.warn(f"init replace skipped: {reason}", stacklevel=3)
        context.notes["init_replace"] = {"skipped": reason}
        return model
    start = time.perf_counter()
    model = get_method("replace").run(model, rows, config, context)
    context.notes["init_replace"] = {"cuts": context.cuts, "seconds": round(time.perf_counter() - start, 1)}
    return model


def _run_procedure(method, model, rows, config, context) -> HealResult:
    """A healing method that is a procedure of its own: no optimizer loop of the Trainer's."""
    start = time.perf_counter()
    _, total = trainable_parameters(model)
    healed = method.run(model, rows, config, context)
    healed.eval()
    check_finite_weights(healed)
    curve = context.loss_curve
    return HealResult(model=healed, method=config.method, trainable_params=context.changed_params,
                      total_params=total, steps=len(curve), tokens_seen=context.tokens,
                      seconds=time.perf_counter() - start, final_loss=curve[-1]["loss"] if curve else None,
                      loss_curve=curve, notes={**context.notes, "cuts": context.cuts})


def _close_process_group_at_exit() -> None:
    """Under `accelerate launch`, tear the process group down before the interpreter exits: left to
    C++ static destructors, gloo's threads can abort a rank at exit ("terminate called without an
    active exception") after training finished."""
    import atexit

    if torch.distributed.is_available() and torch.distributed.is_initialized() and not _close_process_group_at_exit.done:
        _close_process_group_at_exit.done = True
        atexit.register(lambda: torch.distributed.is_initialized() and torch.distributed.destroy_process_group())


_close_process_group_at_exit.done = False


def _tokens_in_steps(rows, trainer, accumulation) -> int:
    """Labelled tokens in the examples the steps consumed (approximate: the average example)."""
    per_example = sum(sum(1 for label in r["labels"] if label != IGNORE_INDEX) for r in rows) / len(rows)
    examples = trainer.state.global_step * accumulation * trainer.args.per_device_train_batch_size
    return int(per_example * examples)


def _train(trainer, checkpoint, work_dir: Path):
    """trainer.train; a full disk while saving a checkpoint is one error, and the checkpoint it was writing
    (no trainer_state.json yet: the Trainer writes it last) is removed instead of left filling the disk."""
    try:
        return trainer.train(resume_from_checkpoint=checkpoint)
    except Exception as err:
        _close_progress_bars(trainer)  # so the error line starts on a line of its own
        message = disk_full_message(err, work_dir)
        if message is None:
            raise
        for folder in work_dir.glob("checkpoint-*") if work_dir.is_dir() else ():
            if folder.is_dir() and not folder.is_symlink() and not (folder / "trainer_state.json").exists():
                shutil.rmtree(folder, ignore_errors=True)
        raise LayerpruneError(message) from None


def _close_progress_bars(trainer) -> None:
    for callback in trainer.callback_handler.callbacks:
        for name in ("training_bar", "prediction_bar"):
            bar = getattr(callback, name, None)
            if bar is not None:
                bar.close()
                setattr(callback, name, None)


def _last_checkpoint(work_dir: Path):
    from transformers.trainer_utils import get_last_checkpoint

    if not work_dir.is_dir():
        return None
    return get_last_checkpoint(str(work_dir))


def write_loss_curve(curve: list[dict], out_dir: Path) -> list[Path]:
    """loss.csv and loss.png."""
    out_dir = Path(out_dir)
    with open(out_dir / "loss.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["step", "loss", "learning_rate", "grad_norm"],
                                extrasaction="ignore")
        writer.writeheader()
        writer.writerows(curve)
    paths = [out_dir / "loss.csv"]
    if curve:
        plt = pyplot()
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot([c["step"] for c in curve], [c["loss"] for c in curve])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.set_title("healing loss")
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=120)
        plt.close(fig)
        paths.append(out_dir / "loss.png")
    return paths
