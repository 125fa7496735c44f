"""Healing at the cuts: each contiguous run of removed layers is a cut, and the kept layer just before it
is made to produce what the unpruned model (the teacher) has in its residual stream just after the cut.

- `replace` (training-free; ReplaceMe, arXiv 2505.02819): least-squares fit of a linear map T from the
  MLP output M of the layer before the cut to what the cut added, (teacher stream after the cut) minus
  (that layer's output without its MLP); T is folded into the MLP's output projection (W <- T^T W,
  b <- b T), so the model stays a stock checkpoint with the same shapes.
- `block-local`: train the `local_layers` kept layers before each cut on cached inputs so that their
  output matches the teacher's stream after the cut (relative MSE), with AdamW.

Cuts are handled in order; each sees the student with the earlier cuts already healed.
"""

from __future__ import annotations

import torch
from torch import nn

from layerprune.errors import LayerpruneError
from layerprune.finetune.hidden_states import dropped_runs
from layerprune.finetune.methods import heal_compute, register_method
from layerprune.finetune.normal_equations import solve_normal_equations
from layerprune.models.anatomy import get_anatomy
from layerprune.models.decoder_calls import call_layer, hidden_of, layer_input
from layerprune.models.surgery import kept_layers, provenance
from layerprune.models.tokens import pad_token_id

# Rows used when the config gives no max_samples: enough tokens (64 x 256) for a hidden-size least-squares
# fit or a few hundred local steps, a minute on a CPU for a 135M model.
DEFAULT_LOCAL_ROWS = 64
# Output projections of the MLP branch per family: their output is added to the residual stream as is.
MLP_OUTPUT_PROJECTIONS = ("mlp.down_proj", "mlp.c_proj", "mlp.dense_4h_to_h", "fc2")


def cuts(model: nn.Module) -> list[tuple[int, int]]:
    """Contiguous runs (first, last) of removed ORIGINAL layer indices."""
    return dropped_runs(provenance(model)["dropped_layers"])


def mlp_output_projection(layer: nn.Module) -> nn.Module:
    """The module whose output is the MLP branch's contribution to the residual stream."""
    if hasattr(layer, "post_feedforward_layernorm"):
        raise LayerpruneError("replace folds a linear map into the MLP output, but this family normalises the MLP "
                              "output before the residual (post_feedforward_layernorm): use block-local instead")
    for path in MLP_OUTPUT_PROJECTIONS:
        module = layer.get_submodule(path) if _has(layer, path) else None
        if module is not None:
            return module
    raise LayerpruneError(f"replace does not know the MLP output projection of {type(layer).__name__} "
                          f"(looked for {', '.join(MLP_OUTPUT_PROJECTIONS)})")


def replace_unsupported(model: nn.Module) -> str | None:
    """Why `replace` cannot fold into this model's layers, or None when it can."""
    try:
        mlp_output_projection(get_anatomy(model).layers[0])
    except LayerpruneError as err:
        return str(err)
    return None


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
        return True
    except AttributeError:
        return False


def fold_linear_map(projection: nn.Module, t: torch.Tensor) -> None:
    """Make `projection` output (its old output) @ t: nn.Linear W (out, in) <- t^T W; Conv1D W (in, out) <- W t."""
    t = t.to(projection.weight.dtype)
    with torch.no_grad():
        if isinstance(projection, nn.Linear):
            projection.weight.copy_(t.T @ projection.weight)
        else:  # transformers' Conv1D (GPT-2): y = x W + b
            projection.weight.copy_(projection.weight @ t)
        if projection.bias is not None:
            projection.bias.copy_(projection.bias @ t)


def row_batches(rows: list[dict], pad_id: int, batch_size: int, device):
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        length = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, :len(r["input_ids"])] = torch.tensor(r["input_ids"])
            mask[i, :len(r["input_ids"])] = 1
        yield ids.to(device), mask.to(device)


class Capture:
    """Forward hooks that keep, for one pass, the outputs of named modules and the call arguments (args,
    kwargs) of others: a layer can then be run again on its own with exactly what the model gave it."""

    def __init__(self, outputs: dict[str, nn.Module], inputs_of: dict[int, nn.Module] | None = None):
        self.values: dict[str, torch.Tensor] = {}
        self.inputs: dict[int, tuple[tuple, dict]] = {}
        self.handles = [m.register_forward_hook(self._keep(name)) for name, m in outputs.items()]
        for key, module in (inputs_of or {}).items():
            self.handles.append(module.register_forward_pre_hook(self._keep_inputs(key), with_kwargs=True))

    def _keep(self, name):
        def hook(module, args, output):
            self.values[name] = hidden_of(output).detach()
        return hook

    def _keep_inputs(self, key):
        def hook(module, args, kwargs):
            self.inputs[key] = (tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs))
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()


def cut_positions(student: nn.Module, teacher: nn.Module, first: int, last: int) -> tuple[int, int] | None:
    """(student position of the kept layer before the cut, teacher position of the cut's last layer)."""
    if first == 0:
        return None  # nothing before the cut to carry what it did
    teacher_kept = kept_layers(teacher)
    if last not in teacher_kept:
        raise LayerpruneError(f"the teacher has no layer {last}: it must be the unpruned model")
    return kept_layers(student).index(first - 1), teacher_kept.index(last)


def _forward(model: nn.Module, ids, mask):
    """A plain forward in the weights' dtype: captured streams feed least-squares fits and targets."""
    model(input_ids=ids, attention_mask=mask, use_cache=False)


def teacher_streams(teacher: nn.Module, rows: list[dict], positions: list[int], *, pad_id: int,
                    batch_size: int) -> dict[int, list[torch.Tensor]]:
    """The teacher's residual stream after each of its layers at `positions`, per batch, from one pass."""
    layers = get_anatomy(teacher).layers
    streams: dict[int, list[torch.Tensor]] = {p: [] for p in positions}
    teacher.eval()
    with torch.no_grad():
        for ids, mask in row_batches(rows, pad_id, batch_size, next(teacher.parameters()).device):
            with Capture({str(p): layers[p] for p in positions}) as t:
                _forward(teacher, ids, mask)
            for p in positions:
                streams[p].append(t.values[str(p)])
    return streams


def fit_cut(model: nn.Module, teacher: nn.Module, first: int, last: int, rows: list[dict], *, pad_id: int,
            batch_size: int = 8, targets: list[torch.Tensor] | None = None):
    """(MLP output projection of the layer before the cut, the least-squares map T, tokens used), or None
    for a cut at the very start. T minimises ||M T - (teacher stream after the cut - (layer output - M))||.
    `targets`: the teacher's stream after the cut per batch (teacher_streams), computed here when None."""
    where = cut_positions(model, teacher, first, last)
    if where is None:
        return None
    position, teacher_position = where
    if targets is None:
        targets = teacher_streams(teacher, rows, [teacher_position], pad_id=pad_id,
                                  batch_size=batch_size)[teacher_position]
    layer = get_anatomy(model).layers[position]
    projection = mlp_output_projection(layer)
    device = next(model.parameters()).device
    fit = LeastSquares()
    with torch.no_grad():
        for (ids, mask), target in zip(row_batches(rows, pad_id, batch_size, device), targets):
            with Capture({"layer": layer, "mlp": projection}) as s:
                _forward(model, ids, mask)
            fit.add(s.values["mlp"], s.values["layer"], target, mask)
    return projection, fit.solve(), fit.tokens


class LeastSquares:
    """Accumulates, batch by batch and in place, the normal equations of T in  M T = target - (layer output - M)
    (fp64, hidden x hidden), and solves them in place by Cholesky (finetune/normal_equations.py)."""

    def __init__(self):
        self.gram = self.rhs = None
        self.tokens = 0

    def add(self, mlp: torch.Tensor, layer_output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> None:
        keep = mask.bool()
        m = mlp[keep].double()
        wanted = (target - (layer_output - mlp))[keep].double()
        if self.gram is None:
            self.gram = m.new_zeros(m.shape[1], m.shape[1])
            self.rhs = m.new_zeros(m.shape[1], wanted.shape[1])
        self.gram.addmm_(m.T, m)  # no gram-sized temporary
        self.rhs.addmm_(m.T, wanted)
        self.tokens += int(keep.sum())

    def solve(self) -> torch.Tensor:
        """T (fp32), with a tiny ridge (grown where the system is not numerically positive definite); the gram
        matrix is factored in place and the right-hand side becomes the solution: no second copy of either."""
        t = solve_normal_equations(self.gram, self.rhs).float()
        self.gram = self.rhs = None
        return t


def _teacher_positions(model, teacher) -> dict[tuple[int, int], int]:
    """Teacher position of the last layer of every cut that has a kept layer before it."""
    found = {}
    for first, last in cuts(model):
        where = cut_positions(model, teacher, first, last)
        if where is not None:
            found[(first, last)] = where[1]
    return found


@register_method("replace", default_data="c4", needs_teacher=True)
class Replace:
    """Training-free: a least-squares linear map per cut, folded into the MLP output projection before it."""

    @staticmethod
    def run(model, rows, config, context):
        rows = rows[:config.max_samples or DEFAULT_LOCAL_ROWS]
        model.eval()
        pad = pad_token_id(context.tokenizer)
        positions = _teacher_positions(model, context.teacher)
        streams = teacher_streams(context.teacher, rows, sorted(set(positions.values())), pad_id=pad,
                                  batch_size=config.batch_size)  # one teacher pass for every cut
        fitted, changed = [], 0
        for first, last in cuts(model):
            where = positions.get((first, last))
            fit = fit_cut(model, context.teacher, first, last, rows, pad_id=pad, batch_size=config.batch_size,
                          targets=streams[where] if where is not None else None)
            if fit is None:
                context.notes.setdefault("skipped_cuts", []).append([first, last])
                continue
            projection, t_map, tokens = fit
            fold_linear_map(projection, t_map)
            changed += sum(p.numel() for p in projection.parameters())
            fitted.append({"cut": [first, last], "into_layer": first - 1, "tokens": tokens})
        context.cuts, context.changed_params, context.tokens = fitted, changed, sum(f["tokens"] for f in fitted)
        return model


@register_method("block-local", default_data="c4", needs_teacher=True)
class BlockLocal:
    """Train the kept layers before each cut, on cached inputs, to reproduce the teacher's stream after it."""

    @staticmethod
    def run(model, rows, config, context):
        teacher, pad = context.teacher, pad_token_id(context.tokenizer)
        rows = rows[:config.max_samples or DEFAULT_LOCAL_ROWS]
        device = next(model.parameters()).device
        compute = heal_compute(model, config)
        student_layers = get_anatomy(model).layers
        positions = _teacher_positions(model, teacher)
        streams = teacher_streams(teacher, rows, sorted(set(positions.values())), pad_id=pad,
                                  batch_size=config.batch_size)  # one teacher pass for every cut
        curve, trained, changed = [], [], 0
        for first, last in cuts(model):
            where = cut_positions(model, teacher, first, last)
            if where is None:
                context.notes.setdefault("skipped_cuts", []).append([first, last])
                continue
            position = where[0]
            span = list(range(max(0, position - config.local_layers + 1), position + 1))
            batches = []
            model.eval()
            with torch.no_grad():  # inputs of the first trained layer, cached once per cut
                for (ids, mask), target in zip(row_batches(rows, pad, config.batch_size, device), streams[where[1]]):
                    with Capture({}, inputs_of={i: student_layers[i] for i in span}) as s:
                        _forward(model, ids, mask)
                    batches.append((s.inputs, target, mask.bool()))
            params = [p for i in span for p in student_layers[i].parameters()]

            def forward(j: int) -> torch.Tensor:
                inputs = batches[j][0]
                hidden = layer_input(*inputs[span[0]])
                for i in span:  # each layer with its own arguments (masks differ between layer types)
                    hidden = call_layer(student_layers[i], hidden, *inputs[i])
                return hidden

            steps = train_span(params, forward, [(b[1], b[2]) for b in batches], config, compute, curve)
            changed += sum(p.numel() for p in params)
            trained.append({"cut": [first, last], "trained_layers": [kept_layers(model)[i] for i in span],
                            "steps": steps})
        context.cuts, context.changed_params, context.loss_curve = trained, changed, curve
        context.tokens = sum(len(r["input_ids"]) for r in rows)
        return model


def train_span(params: list, forward, targets: list[tuple[torch.Tensor, torch.Tensor]], config, compute,
               curve: list[dict]) -> int:
    """AdamW on `params` so that forward(j) (the trained layers on batch j's cached input) matches batch j's
    target (the teacher's stream after the cut) at the kept positions: relative MSE, batches in turn.
    Returns the steps taken; each step's loss is appended to `curve`."""
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    steps = config.max_steps if config.max_steps > 0 else max(1, round(config.epochs * len(targets)))
    for step in range(steps):
        target, keep = targets[step % len(targets)]
        with compute.autocast():
            hidden = forward(step % len(targets))
        wanted = target[keep].float()
        loss = (hidden[keep].float() - wanted).pow(2).mean() / wanted.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append({"step": len(curve) + 1, "loss": float(loss.detach()), "learning_rate": config.learning_rate})
    for p in params:
        p.requires_grad_(False)
    return steps
