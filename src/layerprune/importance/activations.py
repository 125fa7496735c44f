"""Metrics computed from the hidden states around each decoder layer, all in one forward pass.

- `block-influence` (BI): ShortGPT (Men et al., 2024, arXiv 2403.03853):
  BI_i = 1 - E_{x,t}[cos(X_i,t, X_{i+1,t})], the mean taken over every real token.
- `relative-magnitude`: the ShortGPT baseline (Samragh et al.): E_{x,t}[‖f(x)‖ / ‖x + f(x)‖],
  f(x) = layer output - layer input.
- `angular`: Gromov et al., "The Unreasonable Ineffectiveness of the Deeper Layers" (2024, arXiv
  2403.17887), as written in "The impact of LLM pruning for fine-tuning" (Stanford CS224N, eq. 1):
  d(x_i, x_{i+m}) = arccos(cos(x_i,T, x_{i+m},T)) / π on the last real token T of each sample, averaged over samples.

X_i is the input of layer i, X_{i+1} its output (= the next layer's input). Hidden states are
taken with forward hooks on the decoder blocks, never from `output_hidden_states`, whose last
entry comes after the final norm. Statistics are computed in float32 (float64 accumulators)
whatever the model dtype, and padding tokens never enter a mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from layerprune.errors import LayerpruneError
from layerprune.importance.registry import register_group, register_metric
from layerprune.models.anatomy import get_anatomy
from layerprune.models.decoder_calls import hidden_of, last_logits_kwargs, layer_input

GROUP = "activations"
DEFAULT_BATCH_SIZE = 8
# Parameters each metric of the group accepts (batch_size only changes memory and speed).
_PARAMS = {
    "block-influence": {"batch_size"},
    "relative-magnitude": {"batch_size"},
    "angular": {"batch_size", "block_size", "max_block_size"},
}


# ---------------------------------------------------------------------------------------------
# Pure helpers on tensors
# ---------------------------------------------------------------------------------------------


def last_real_positions(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real (mask == 1) token of each row; works for right and left padding."""
    length = mask.shape[1]
    return length - 1 - mask.flip(1).to(torch.long).argmax(dim=1)


def token_cosines(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """cos(x_t, y_t) per token, in float32: [B, L, H] x2 -> [B, L]."""
    return F.cosine_similarity(x.float(), y.float(), dim=-1)


def token_relative_magnitudes(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """‖f(x)‖ / ‖x + f(x)‖ per token with f(x) = y - x, in float32: [B, L, H] x2 -> [B, L]."""
    x, y = x.float(), y.float()
    # clamp: an all-zero output would divide by zero; its ratio is then ‖f‖ / eps (huge, as it should).
    return (y - x).norm(dim=-1) / y.norm(dim=-1).clamp_min(1e-12)


def angular_distance(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """arccos(cos(u, v)) / π along the last dim, in float64.

    Computed as 2·atan2(‖û - v̂‖, ‖û + v̂‖), equal to arccos(cos) but accurate when the vectors are
    nearly parallel, which is exactly the regime that decides which block to drop.
    """
    u = F.normalize(u.double(), dim=-1)
    v = F.normalize(v.double(), dim=-1)
    return 2 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1)) / math.pi


def distance_table(last_tokens: torch.Tensor, max_block_size: int) -> dict[str, list[float]]:
    """{str(m): [d(i, i+m) for i in 0..n-m]} for m in 1..M, averaged over samples.

    last_tokens: [N, n+1, H] the last-token vector of every layer input plus the last layer's output.
    """
    n = last_tokens.shape[1] - 1
    table = {}
    for m in range(1, max_block_size + 1):
        d = angular_distance(last_tokens[:, : n + 1 - m], last_tokens[:, m:])  # [N, n-m+1]
        table[str(m)] = [float(v) for v in d.mean(dim=0)]
    return table


# ---------------------------------------------------------------------------------------------
# The one pass
# ---------------------------------------------------------------------------------------------


@dataclass
class ActivationAccumulator:
    """Running per-layer statistics; each hook reduces its batch at once, nothing else is kept."""

    n_layers: int
    want_cos: bool
    want_rel: bool
    want_last: bool
    cos_sum: list = field(default_factory=list)
    rel_sum: list = field(default_factory=list)
    tokens: list = field(default_factory=list)
    # last_tokens[i] lists [B, H] float32 CPU chunks of layer i's input (i = n: last layer's output)
    last_tokens: list = field(default_factory=list)
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.cos_sum = [0.0] * self.n_layers
        self.rel_sum = [0.0] * self.n_layers
        self.tokens = [0.0] * self.n_layers
        self.last_tokens = [[] for _ in range(self.n_layers + 1)]

    def observe(self, i: int, x: torch.Tensor, y: torch.Tensor) -> None:
        mask = self.mask.to(x.device)
        real = mask.bool()
        if self.want_cos or self.want_rel:
            self.tokens[i] = self.tokens[i] + real.sum()
        # where() rather than a product with the mask: a padded token may give inf/nan, and 0 * nan = nan.
        if self.want_cos:
            self.cos_sum[i] = self.cos_sum[i] + torch.where(real, token_cosines(x, y).double(), 0.0).sum()
        if self.want_rel:
            self.rel_sum[i] = self.rel_sum[i] + torch.where(real, token_relative_magnitudes(x, y).double(), 0.0).sum()
        if self.want_last:
            rows = torch.arange(x.shape[0], device=x.device)
            last = last_real_positions(mask)
            self.last_tokens[i].append(x[rows, last].float().cpu())
            if i == self.n_layers - 1:
                self.last_tokens[i + 1].append(y[rows, last].float().cpu())


def _hook(acc: ActivationAccumulator, i: int):
    def hook(module, args, kwargs, out):
        acc.observe(i, layer_input(args, kwargs), hidden_of(out))

    return hook


def calibration_forward(model, calibration, batch_size: int, handles: list, before_batch) -> None:
    """Every non-empty calibration batch through the model: eval mode, no gradients, last logits only.

    The model's hooks (`handles`) do the measuring; `before_batch(mask)` runs before each batch's forward.
    Afterwards, even on an error, the hooks are removed and the model's training mode is restored.
    """
    device = get_anatomy(model).embeddings.weight.device
    extra = last_logits_kwargs(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for ids, mask in calibration.nonempty_batches(batch_size):
                before_batch(mask)
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **extra)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def run_pass(
    model, calibration, *, batch_size: int, want_cos: bool, want_rel: bool, want_last: bool
) -> ActivationAccumulator:
    """One forward pass over the calibration set with a hook on every decoder layer."""
    if batch_size < 1:
        raise LayerpruneError(f"batch_size must be >= 1, got {batch_size}")
    layers = get_anatomy(model).layers
    acc = ActivationAccumulator(len(layers), want_cos, want_rel, want_last)
    handles = [layer.register_forward_hook(_hook(acc, i), with_kwargs=True) for i, layer in enumerate(layers)]

    def set_mask(mask):
        acc.mask = mask

    calibration_forward(model, calibration, batch_size, handles, set_mask)
    return acc


def check_known_params(requests: dict[str, dict], accepted: dict[str, set], group: str) -> None:
    """One error for a metric outside `group` or a parameter the metric does not take."""
    for name, params in requests.items():
        if name not in accepted:
            raise LayerpruneError(f"metric {name!r} is not part of the {group!r} group")
        unknown = set(params) - accepted[name]
        if unknown:
            raise LayerpruneError(
                f"metric {name!r} got unknown parameter(s) {sorted(unknown)}; it accepts {sorted(accepted[name])}"
            )


def _block_sizes(n: int, params: dict) -> tuple[int, int]:
    m = params.get("block_size", 1)
    top = params.get("max_block_size")
    top = m if top is None else top
    for label, value in (("block_size", m), ("max_block_size", top)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1 or value > n:
            raise LayerpruneError(
                f"angular: {label} must be an integer in 1..{n} (the model has {n} layers), got {value!r}"
            )
    if top < m:
        raise LayerpruneError(f"angular: max_block_size ({top}) must be >= block_size ({m})")
    return m, top


def _finish_angular(acc: ActivationAccumulator, n: int, params: dict) -> tuple[list[float], dict]:
    m, top = _block_sizes(n, params)
    last_tokens = torch.stack([torch.cat(chunks) for chunks in acc.last_tokens], dim=1)  # [N, n+1, H]
    table = distance_table(last_tokens, top)
    valid = table[str(m)]
    values = valid + [float("nan")] * (n - len(valid))
    return values, {"block_size": m, "distances": table}


def _means(sums: list, counts: list) -> list[float]:
    return [float(s) / float(c) for s, c in zip(sums, counts)]


def check_requests(requests: dict[str, dict], n_layers: int) -> int:
    """Refuse unknown metrics or parameters and bad angular block sizes before the (possibly long) pass;
    return the pass's batch size: the smallest `batch_size` asked for (default 8), batching only changes memory.
    """
    check_known_params(requests, _PARAMS, GROUP)
    if "angular" in requests:
        _block_sizes(n_layers, requests["angular"])
    sizes = [params.get("batch_size") for params in requests.values()]
    return min((DEFAULT_BATCH_SIZE if size is None else size) for size in sizes)


@register_group(GROUP)
def activation_metrics(model, calibration, requests: dict[str, dict]) -> dict[str, object]:
    """Compute every requested activation metric ({name: params}) from ONE forward pass (see check_requests)."""
    n = get_anatomy(model).num_layers
    batch_size = check_requests(requests, n)
    acc = run_pass(
        model,
        calibration,
        batch_size=batch_size,
        want_cos="block-influence" in requests,
        want_rel="relative-magnitude" in requests,
        want_last="angular" in requests,
    )
    return finish_activation_metrics(acc, n, requests)


def finish_activation_metrics(acc: ActivationAccumulator, n: int, requests: dict[str, dict]) -> dict[str, object]:
    """The requested metrics from accumulated statistics (shared with the streaming path)."""
    results: dict[str, object] = {}
    if "block-influence" in requests:
        results["block-influence"] = [1.0 - c for c in _means(acc.cos_sum, acc.tokens)]
    if "relative-magnitude" in requests:
        results["relative-magnitude"] = _means(acc.rel_sum, acc.tokens)
    if "angular" in requests:
        results["angular"] = _finish_angular(acc, n, requests["angular"])
    return results


# ---------------------------------------------------------------------------------------------
# The metrics (each one is the group run with a single request)
# ---------------------------------------------------------------------------------------------


@register_metric(
    "block-influence",
    needs_calibration=True,
    description="ShortGPT BI: 1 - mean cosine between a layer's input and output tokens",
    group=GROUP,
)
def block_influence(model, calibration, batch_size: int = DEFAULT_BATCH_SIZE) -> list[float]:
    """BI_i = 1 - mean over real tokens of cos(X_i,t, X_{i+1},t). A layer that changes its input
    little has a low BI and is dropped first; higher BI = more important, so no negation."""
    return activation_metrics(model, calibration, {"block-influence": {"batch_size": batch_size}})["block-influence"]


@register_metric(
    "relative-magnitude",
    needs_calibration=True,
    description="mean ‖f(x)‖ / ‖x + f(x)‖ over tokens, f(x) = layer output - input (ShortGPT baseline)",
    group=GROUP,
)
def relative_magnitude(model, calibration, batch_size: int = DEFAULT_BATCH_SIZE) -> list[float]:
    """Mean over real tokens of ‖f(x)‖ / ‖x + f(x)‖: how much the residual branch adds, relative to
    the layer output. Bigger = the layer does more = more important (no negation)."""
    return activation_metrics(model, calibration, {"relative-magnitude": {"batch_size": batch_size}})[
        "relative-magnitude"
    ]


def angular_params(n_layers: int, block_size: int) -> dict:
    """A block as long as the cut; the table of every block size up to the whole model comes with it, so a
    parameter or latency target can try other cuts from one pass."""
    if not 1 <= block_size <= n_layers:
        raise LayerpruneError(f"angular block size must be between 1 and {n_layers}, got {block_size}")
    return {"block_size": block_size, "max_block_size": n_layers}


@register_metric(
    "angular",
    needs_calibration=True,
    description="Gromov et al.: arccos(cos(x_i, x_i+m))/π on the last token; the block of m layers "
    "starting at the smallest value is dropped",
    group=GROUP,
    default_params=lambda cut: angular_params(cut.n_layers, cut.n_drop),
)
def angular(
    model,
    calibration,
    block_size: int = 1,
    max_block_size: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> tuple[list[float], dict]:
    """Angular distance between the input of layer i and the input of layer i+m (for i+m = n: the
    last layer's output, before the final norm), on the last real token of each sample, averaged
    over samples.

    values[i] = d(i, i+m) for every valid block start i <= n-m, and NaN for i > n-m, which cannot
    start a block of m layers. A small distance means the block i..i+m-1 is redundant, so the
    distance itself is the score (higher = keep), no negation.
    extra = {"block_size": m, "distances": {str(m'): [d(i, i+m') for i in 0..n-m']} for m' in 1..M}
    with M = max_block_size (default m). Raises LayerpruneError unless 1 <= m <= M <= n.
    """
    params = {"block_size": block_size, "max_block_size": max_block_size, "batch_size": batch_size}
    return activation_metrics(model, calibration, {"angular": params})["angular"]
