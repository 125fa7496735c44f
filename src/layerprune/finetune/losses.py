"""Healing losses computed where the labels are, a chunk of positions at a time.

A causal LM's head turns every position into vocabulary-sized logits; materialising them (and their
gradient) for a whole batch costs batch x length x vocab x 4 bytes twice (~15 GB for 8 x 1024 tokens of
a 49k vocabulary). Here the decoder runs once, the positions that carry a label are gathered, and the
head + loss run on chunks of them under activation checkpointing, so only one chunk's logits exist at a
time (the idea of fused / chunked cross-entropy). The numbers equal the plain loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from layerprune.models.logits import head_logits


def chunked_cross_entropy(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, *, softcap=None,
                          chunk: int = 1024) -> torch.Tensor:
    """Sum of the next-token cross-entropy over the positions, one chunk of logits alive at a time."""

    def piece(h, y):
        return F.cross_entropy(head_logits(head, h, softcap), y, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        h, y = hidden[start:start + chunk], targets[start:start + chunk]
        total = total + (checkpoint(piece, h, y, use_reentrant=False) if torch.is_grad_enabled() else piece(h, y))
    return total


def topk_kl(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """Sum over positions of KL(teacher || student) on the teacher's top-k tokens, times T^2.

    The teacher's distribution is its top-k logits renormalised; the student's log-probabilities are over
    the whole vocabulary, so mass the student puts outside the teacher's top-k is penalised too. With
    indices None (`values` = every logit) this is the exact KL."""
    s = F.log_softmax(student_logits / temperature, dim=-1)
    if indices is not None:  # None: `values` are the teacher's logits over the whole vocabulary
        s = s.gather(-1, indices.long())
    t = F.log_softmax(values.float() / temperature, dim=-1)
    return (t.exp() * (t - s)).sum() * temperature**2


def chunked_distillation(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, teacher_topk, *,
                         temperature: float, alpha: float, softcap=None, chunk: int = 1024) -> torch.Tensor:
    """Sum over positions of alpha * KL(teacher top-k || student) + (1 - alpha) * CE, chunk by chunk.

    teacher_topk(start, stop) -> (values, indices) of the positions [start, stop)."""

    def piece(h, y, values, indices):
        logits = head_logits(head, h, softcap)
        loss = alpha * topk_kl(logits, values, indices, temperature)
        if alpha < 1:
            loss = loss + (1 - alpha) * F.cross_entropy(logits, y, reduction="sum")
        return loss

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(targets), chunk):
        stop = min(start + chunk, len(targets))
        values, indices = teacher_topk(start, stop)
        args = (hidden[start:stop], targets[start:stop], values, indices)
        total = total + (checkpoint(piece, *args, use_reentrant=False) if torch.is_grad_enabled() else piece(*args))
    return total
