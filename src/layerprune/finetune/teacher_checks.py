"""A teacher checked against its student before any work: distillation compares the two models' outputs
token id by token id (and, for hidden-state and layer-wise methods, hidden state by hidden state), so a
teacher whose tokenizer maps ids differently, or whose hidden size differs, cannot teach. Only the
vocabulary sizes used to be compared: a teacher of the same size but another mapping trained the student on
shuffled targets, and one of another hidden size failed with a RuntimeError after the teacher pass.
"""

from __future__ import annotations

from layerprune.errors import LayerpruneError
from layerprune.finetune.config import HealConfig
from layerprune.models.loading import folder_tokenizer, model_folder
from layerprune.models.model_config import read_model_config

LAYER_WISE_METHODS = ("replace", "block-local")


def compares_hidden_states(config: HealConfig) -> bool:
    return config.hidden_weight > 0 or config.method in LAYER_WISE_METHODS or config.init == "replace"


def check_teacher(student_config, student_tokenizer, teacher_ref: str, config: HealConfig) -> None:
    """Refuse, from configs and tokenizers alone, a teacher that cannot teach this student."""
    folder = model_folder(teacher_ref)
    if compares_hidden_states(config):
        student = student_config.get_text_config().hidden_size
        teacher = read_model_config(folder).get_text_config().hidden_size
        if student != teacher:
            raise LayerpruneError(f"the teacher {teacher_ref} has hidden size {teacher} and the model {student}: "
                                  f"{config.method} compares hidden states, so it needs the unpruned original as "
                                  "the teacher")
    teacher_tokenizer = folder_tokenizer(folder)
    if teacher_tokenizer is None or student_tokenizer is None:
        return  # a weights-only folder: the vocabulary sizes are still compared when the teacher loads
    ours, theirs = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if ours != theirs:
        token = next((t for t in sorted(ours) if theirs.get(t) != ours[t]), None) or \
            next(t for t in sorted(theirs) if t not in ours)
        raise LayerpruneError(
            f"the teacher {teacher_ref} has another tokenizer than the model: token {token!r} is id "
            f"{theirs.get(token, 'absent')} there and {ours.get(token, 'absent')} here; distillation compares "
            "them id by id, so use the unpruned original as the teacher")


def check_vocab_sizes(student: int, teacher: int, teacher_ref: str) -> None:
    """Distillation matches logits token by token: a teacher of another vocabulary cannot teach."""
    if student != teacher:
        raise LayerpruneError(f"the teacher {teacher_ref} has a vocabulary of {teacher:,} tokens and the model "
                              f"{student:,}: distillation needs the same tokenizer; use the unpruned original as "
                              "the teacher")
