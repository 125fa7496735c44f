"""Distillation on the hidden states at the cuts (`distill_hidden`), as Minitron distils intermediate states
("Compact Language Models via Pruning and Knowledge Distillation", arXiv 2407.14679; "LLM Pruning and
Distillation in Practice: The Minitron Approach", arXiv 2408.11796).

After a cut (a run of removed layers), the next kept layer expects the residual stream the teacher has
after the cut; the student hands it the output of the kept layer before the cut. The loss asks the
student's state there to match the teacher's: at every labelled position, the squared error relative to
the teacher state's squared norm, averaged over the cuts. A cut at the very start (no kept layer before
it) has no student state to train and is left out. The teacher's states are recorded in the same pass as
its top-k logits and cached with them.
"""

from __future__ import annotations

import torch
from torch import nn

from layerprune.models.anatomy import get_anatomy
from layerprune.models.decoder_calls import hidden_of
from layerprune.models.tokens import IGNORE_INDEX


def dropped_runs(dropped: list[int]) -> list[tuple[int, int]]:
    """Contiguous runs (first, last) of removed ORIGINAL layer indices: the cuts."""
    runs: list[list[int]] = []
    for layer in sorted(dropped):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return [(run[0], run[-1]) for run in runs]


def cut_pairs(dropped: list[int], kept: list[int]) -> list[tuple[int, int]]:
    """(student layer index, teacher layer index) per cut: the student's output of the kept layer before the
    cut should equal the teacher's output of the cut's last layer. Indices of the student are positions in
    `kept`; the teacher's are original indices."""
    return [(kept.index(first - 1), last) for first, last in dropped_runs(dropped) if first > 0]


class StateRecorder:
    """Forward hooks that keep the output hidden states of some decoder layers of the latest forward."""

    def __init__(self, model: nn.Module, layers: list[int]):
        self.states: dict[int, torch.Tensor] = {}
        blocks = get_anatomy(model).layers

        def keep(i):
            def hook(module, args, output):
                self.states[i] = hidden_of(output)

            return hook

        self.handles = [blocks[i].register_forward_hook(keep(i)) for i in layers]
        self.layers = list(layers)

    def at_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """(labelled positions, layers, hidden): the recorded states where a next-token label is, in the
        order labelled_positions flattens them."""
        keep = labels[:, 1:] != IGNORE_INDEX
        return torch.stack([self.states[i][:, :-1][keep] for i in self.layers], dim=1)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.states.clear()


def relative_state_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Sum over positions of the mean over cuts of ||s - t||^2 / ||t||^2 (fp32); inputs (positions, cuts, hidden)."""
    student, teacher = student.float(), teacher.float()
    error = (student - teacher).pow(2).sum(-1) / teacher.pow(2).sum(-1).clamp_min(1e-12)
    return error.mean(-1).sum()
