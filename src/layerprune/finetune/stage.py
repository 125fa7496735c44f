"""The healing stage around the training loop: the rows to train on (the teacher answering the prompts where
asked), the teacher-first targets made before the student loads, the budget left after them, healing layer by
layer from disk, and writing the healed folder. The one heal path of the API, the CLI, YAML runs and
iterative rounds."""

from __future__ import annotations

import time
from pathlib import Path

from layerprune.data.instructions import prompt_ids
from layerprune.data.training_rows import training_rows
from layerprune.errors import LayerpruneError
from layerprune.files.outputs import atomic_output_dir, write_json
from layerprune.files.user_files import check_free_space
from layerprune.finetune.budget import less_budget
from layerprune.finetune.config import HealConfig
from layerprune.finetune.finite import check_finite_weights
from layerprune.finetune.fit import fit_heal
from layerprune.finetune.hidden_states import cut_pairs
from layerprune.finetune.methods import get_method
from layerprune.finetune.placement import student_dtype, teacher_loader
from layerprune.finetune.streaming_local import stream_heal
from layerprune.finetune.teacher_checks import check_teacher, check_vocab_sizes
from layerprune.finetune.teacher_first import (
    distills_from_cache,
    examples_needed,
    targets_before_student,
    teacher_placement,
)
from layerprune.finetune.teacher_responses import answered_by_teacher
from layerprune.finetune.trainer import heal, write_loss_curve
from layerprune.models.anatomy import parameter_bytes
from layerprune.models.checkpoint_rewrite import rewrite_checkpoint
from layerprune.models.layer_stream import local_folder
from layerprune.models.loading import folder_tokenizer, model_folder, resolve_model_ref
from layerprune.models.model_config import read_model_config
from layerprune.models.saving import model_folder_bytes, write_model_files
from layerprune.models.surgery import config_provenance, provenance
from layerprune.models.tokens import pad_token_id


HEAL_FILES_BYTES = 1_000_000  # heal.json, loss.csv and loss.png beside the model's files (~100 KB together)

def prepare_training_rows(config: HealConfig, tokenizer, *, load_teacher=None, log=print
                          ) -> tuple[list[dict], dict]:
    """Tokenized training rows of a healing config and a description of the data (data/training_rows.py),
    the method's default data where none is given. With `responses: teacher` the instruction examples the
    steps read are answered by the teacher that `load_teacher()` loads (finetune/teacher_responses.py)."""
    if config.responses == "teacher" and load_teacher is None:
        raise LayerpruneError("responses: teacher needs a teacher to answer the prompts: set teacher (the unpruned "
                              "model)")
    method = get_method(config.method)

    def answer(examples, share: float):
        needed = _fitting_prompts(examples, tokenizer, config, examples_needed(config, share))
        return answered_by_teacher(needed, tokenizer, load_teacher, new_tokens=config.response_tokens,
                                   bf16=config.bf16, template=config.template, log=log)

    return training_rows(config, tokenizer, default_data=method.default_data, raw_text=method.raw_text,
                         answer=answer if config.responses == "teacher" else None)


def heal_loaded(loaded, config: HealConfig, *, default_teacher: str | None = None, work_dir=None,
                resume: bool = False, log=print, prepared=None, targets=None, spent: float = 0.0):
    """Heal an in-memory model (loaded.model) with one healing config: the one heal path of the CLI, the
    API, YAML runs and iterative rounds. Returns (HealResult, record for heal.json); the healed model
    (result.model) carries a `healed` entry in its provenance history.
    prepared: (rows, data info) already tokenized; targets: the teacher's top-k targets made before the
    model was loaded (heal_model_ref); spent: seconds of the stage's max_minutes already used (the
    teacher answering prompts); preparing the rows here counts too."""
    config = fit_heal(config, loaded.model.config, loaded_bytes=parameter_bytes(loaded.model), log=log)
    replacing = config.init == "replace" and bool(provenance(loaded.model)["dropped_layers"])  # cuts to replace
    load_teacher = None
    if get_method(config.method).needs_teacher or replacing or config.responses == "teacher":
        teacher_ref = config.teacher or default_teacher or provenance(loaded.model).get("source")
        if not teacher_ref or teacher_ref == loaded.ref:
            wanted = "responses: teacher" if config.responses == "teacher" else config.method
            raise LayerpruneError(f"{wanted} needs a teacher: set teacher (the unpruned model)")
        if targets is None:  # heal_model_ref checked the teacher before its pass
            check_teacher(loaded.model.config, loaded.tokenizer, teacher_ref, config)
        # frozen unless the least-squares replacement reads it (init replace, or the replace/block-local procedures)
        load_teacher = teacher_loader(_vocab_size(loaded.model.config), teacher_ref, config,
                                      frozen=not replacing and get_method(config.method).run is None)
    if prepared is None:
        start = time.perf_counter()
        prepared = prepare_training_rows(config, loaded.tokenizer, load_teacher=load_teacher, log=log)
        spent += time.perf_counter() - start
    rows, data_info = prepared
    if targets is not None or not (get_method(config.method).needs_teacher or replacing):
        load_teacher = None  # targets made before the student loaded, or a teacher only for the responses
    result = heal(loaded.model, rows, less_budget(config, spent), tokenizer=loaded.tokenizer, teacher=load_teacher,
                  targets=targets, work_dir=work_dir, resume=resume, log=log)
    record = {**result.summary(), "config": config.model_dump(mode="json"), "data": data_info}
    history = [*provenance(result.model).get("history", []), {"healed": config.method, "data": data_info["source"]}]
    result.model.config.layerprune = {**result.model.config.layerprune, "history": history}
    return result, record


def heal_model_ref(model_ref: str, config: HealConfig, *, load, tokenizer=None, default_teacher: str | None = None,
                   work_dir=None, resume: bool = False, log=print):
    """heal_loaded of the model at `model_ref`, loaded by `load(dtype)` as late as possible: when distillation's
    teacher pass can run first (finetune/teacher_first.py), the teacher's top-k targets are made with the
    teacher alone in memory (layer by layer from disk when it does not fit), the teacher is freed, and only
    then is the student loaded, in placement.student_dtype (a LoRA base in 16 bits directly). tokenizer: for a
    model folder without one."""
    local = resolve_model_ref(model_ref).kind != "hub"
    if local:  # adapter auto resolved before the load: the dtype the model loads in depends on it
        config = fit_heal(config, read_model_config(model_folder(model_ref)), log=log)
    targets = prepared = None
    spent = 0.0
    if distills_from_cache(config):
        folder = Path(model_folder(model_ref))
        student_config = read_model_config(folder)
        record = config_provenance(student_config, student_config.get_text_config().num_hidden_layers)
        teacher_ref = config.teacher or default_teacher or record.get("source")
        tokenizer = tokenizer or folder_tokenizer(folder)
        teacher_folder = Path(model_folder(teacher_ref)) if teacher_ref and teacher_ref != model_ref else None
        if teacher_folder is not None and teacher_folder.is_dir() and tokenizer is not None:
            check_teacher(student_config, tokenizer, teacher_ref, config)
            first, streamed = teacher_placement(config, folder, teacher_folder)
            if first:
                load_teacher = teacher_loader(_vocab_size(student_config), teacher_ref, config)
                start = time.perf_counter()
                prepared = prepare_training_rows(config, tokenizer, load_teacher=load_teacher, log=log)
                spent = time.perf_counter() - start
                if streamed:
                    check_vocab_sizes(_vocab_size(student_config), _vocab_size(read_model_config(teacher_folder)),
                                       teacher_ref)
                pairs = cut_pairs(record["dropped_layers"], record["kept_layers"]) \
                    if config.hidden_weight and not streamed else []  # a streamed teacher gives logits only
                targets = targets_before_student(prepared[0], config, load_teacher, pad_id=pad_token_id(tokenizer),
                                                 stream_from=teacher_folder if streamed else None, log=log,
                                                 state_layers=[t for _, t in pairs])
    loaded = load(student_dtype(model_ref, config) if local else config.train_dtype)
    if loaded.tokenizer is None:
        loaded.tokenizer = tokenizer
    return heal_loaded(loaded, config, default_teacher=default_teacher, work_dir=work_dir, resume=resume, log=log,
                       prepared=prepared, targets=targets, spent=spent)


def _vocab_size(model_config) -> int:
    return int(model_config.get_text_config().vocab_size)


def heal_streaming(model_ref: str, out, config: HealConfig, *, overwrite: bool):
    """`replace` or `block-local` healing one layer at a time: the student and the teacher stay on disk."""
    if config.method not in ("replace", "block-local"):
        raise LayerpruneError(f"--streaming heals with method replace or block-local (one layer at a time); "
                              f"{config.method} trains the whole model at once")
    if config.responses == "teacher":
        raise LayerpruneError("responses: teacher generates with the whole teacher in memory, and --streaming is for "
                              "models bigger than memory: train on the data's responses (responses: data)")
    student = local_folder(model_ref)
    model_config = read_model_config(student)
    record = config_provenance(model_config, model_config.get_text_config().num_hidden_layers)
    teacher_ref = config.teacher or record.get("source")
    if not teacher_ref:
        raise LayerpruneError("replace needs a teacher: set teacher (the unpruned model)")
    tokenizer = folder_tokenizer(student)
    if tokenizer is None:
        raise LayerpruneError(f"{model_ref} has no tokenizer, so the healing text cannot be encoded")
    check_teacher(model_config, tokenizer, teacher_ref, config)
    rows, data_info = prepare_training_rows(config, tokenizer)
    replaced, notes = stream_heal(student, local_folder(teacher_ref), rows, config, pad_id=pad_token_id(tokenizer))
    heal_record = {"method": config.method, "notes": notes, "config": config.model_dump(mode="json"),
                   "data": data_info}
    history = [*record.get("history", []), {"healed": config.method, "data": data_info["source"]}]
    rewrite_checkpoint(student, out, replaced, overwrite=overwrite, provenance={**record, "history": history},
                       record_extra={"heal": heal_record}, files={"heal.json": heal_record}, inputs=[teacher_ref])
    return None, Path(out)


def write_healed(result, record: dict, tokenizer, out, *, overwrite: bool = False) -> Path:
    """The healed model folder: stock checkpoint + heal.json + loss curve, written atomically."""
    check_finite_weights(result.model)  # NaN weights are never saved, whoever healed them
    check_free_space(out, model_folder_bytes(result.model, tokenizer) + HEAL_FILES_BYTES, "the healed model")
    with atomic_output_dir(out, overwrite) as tmp:
        write_model_files(result.model, tokenizer, tmp, extra={"heal": record})
        write_json(Path(tmp) / "heal.json", record)
        write_loss_curve(result.loss_curve, Path(tmp))
    return Path(out)


def _fitting_prompts(examples, tokenizer, config: HealConfig, needed: int | None) -> list:
    """The first `needed` examples whose prompt leaves room for a response within max_length tokens (the
    others would train on nothing: answering them is wasted generation)."""
    fitting = []
    for example in examples:
        if needed is not None and len(fitting) >= needed:
            break
        if len(prompt_ids(tokenizer, example, config.template)) < config.max_length:
            fitting.append(example)
    return fitting
