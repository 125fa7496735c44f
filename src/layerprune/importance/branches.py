"""Block influence of the attention branch and of the MLP branch of each layer, in one forward pass.

ShortGPT's block influence (activations.py) applied to each residual branch instead of the whole block,
to choose which attentions or MLPs to remove (`prune --granularity attention|mlp`, models/sublayer.py):

- `attention-influence`: 1 - E_{x,t}[cos(X_i,t, H_i,t)]
- `mlp-influence`:       1 - E_{x,t}[cos(H_i,t, X_{i+1},t)]

X_i is layer i's input, H_i the residual stream between its two branches (X_i plus the attention
branch; it is the input of the MLP's pre-norm, anatomy `mlp_norms[0]`, hooked there) and X_{i+1} the
layer's output. A branch already removed scores exactly 0. Higher = more important = kept, as for
block influence. Means run over real tokens only, in float32 with float64 accumulators.
"""

from __future__ import annotations

import torch

from layerprune.errors import LayerpruneError
from layerprune.importance.activations import DEFAULT_BATCH_SIZE, calibration_forward, check_known_params, token_cosines
from layerprune.importance.registry import register_group, register_metric
from layerprune.models.anatomy import get_anatomy
from layerprune.models.decoder_calls import hidden_of, layer_input
from layerprune.models.sublayer import branch_spec

GROUP = "branches"
_METRIC_OF = {"attention": "attention-influence", "mlp": "mlp-influence"}


def run_branch_pass(model, calibration, *, batch_size: int = DEFAULT_BATCH_SIZE) -> dict[str, list[float]]:
    """{"attention": [...], "mlp": [...]} branch influence of every current layer, from one forward pass."""
    if batch_size < 1:
        raise LayerpruneError(f"batch_size must be >= 1, got {batch_size}")
    spec = branch_spec(model)
    layers = get_anatomy(model).layers
    n = len(layers)
    sums = {kind: [0.0] * n for kind in _METRIC_OF}
    tokens = [0.0] * n
    between: dict[int, torch.Tensor] = {}
    state: dict[str, torch.Tensor] = {}

    def capture_between(i):
        def hook(module, args):
            between[i] = args[0]

        return hook

    def observe(i):
        def hook(module, args, kwargs, out):
            x, h, y = layer_input(args, kwargs), between.pop(i), hidden_of(out)
            real = state["mask"].to(x.device).bool()
            tokens[i] = tokens[i] + real.sum()
            for kind, (a, b) in (("attention", (x, h)), ("mlp", (h, y))):
                # where() rather than a product with the mask: a padded token may give nan, and 0 * nan = nan.
                sums[kind][i] = sums[kind][i] + torch.where(real, token_cosines(a, b).double(), 0.0).sum()

        return hook

    handles = []
    for i, block in enumerate(layers):
        handles.append(getattr(block, spec.mlp_norms[0]).register_forward_pre_hook(capture_between(i)))
        handles.append(block.register_forward_hook(observe(i), with_kwargs=True))
    calibration_forward(model, calibration, batch_size, handles, lambda mask: state.update(mask=mask))
    return {kind: [1.0 - float(s) / float(c) for s, c in zip(sums[kind], tokens)] for kind in _METRIC_OF}


@register_group(GROUP)
def branch_metrics(model, calibration, requests: dict[str, dict]) -> dict[str, object]:
    """Every requested branch metric from ONE pass (the smallest batch_size asked for)."""
    check_known_params(requests, {metric: {"batch_size"} for metric in _METRIC_OF.values()}, GROUP)
    batch_size = min(params.get("batch_size") or DEFAULT_BATCH_SIZE for params in requests.values())
    values = run_branch_pass(model, calibration, batch_size=batch_size)
    return {metric: values[kind] for kind, metric in _METRIC_OF.items() if metric in requests}


@register_metric(
    "attention-influence",
    needs_calibration=True,
    description="block influence of the attention branch: 1 - mean cosine between a layer's input and the "
    "residual stream after its attention (for --granularity attention)",
    group=GROUP,
    granularities=("attention",),
)
def attention_influence(model, calibration, batch_size: int = DEFAULT_BATCH_SIZE) -> list[float]:
    """1 - mean over real tokens of cos(X_i,t, H_i,t); a removed attention scores 0."""
    return branch_metrics(model, calibration, {"attention-influence": {"batch_size": batch_size}})[
        "attention-influence"
    ]


@register_metric(
    "mlp-influence",
    needs_calibration=True,
    description="block influence of the MLP branch: 1 - mean cosine between the residual stream before and "
    "after a layer's MLP (for --granularity mlp)",
    group=GROUP,
    granularities=("mlp",),
)
def mlp_influence(model, calibration, batch_size: int = DEFAULT_BATCH_SIZE) -> list[float]:
    """1 - mean over real tokens of cos(H_i,t, X_{i+1},t); a removed MLP scores 0."""
    return branch_metrics(model, calibration, {"mlp-influence": {"batch_size": batch_size}})["mlp-influence"]
