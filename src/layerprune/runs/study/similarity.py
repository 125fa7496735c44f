"""The study's similarity stage: linear CKA between the final hidden states of the original and of every
setting's final model, written to similarity.json (the report only plots that file)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn

from layerprune.config import RunConfig
from layerprune.errors import LayerpruneError
from layerprune.files.outputs import read_json, write_json
from layerprune.hardware.timing import model_device
from layerprune.models.anatomy import get_anatomy
from layerprune.runs.pipeline import Run


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Centered linear CKA (Kornblith et al. 2019) of [n, d1] and [n, d2] features of the same n examples.

    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F): 1 for equal representations, invariant to
    orthogonal transforms and isotropic scaling. The n x n Gram form is used when n is smaller than the widths.
    """
    x, y = torch.as_tensor(x, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise LayerpruneError(f"CKA needs [n, d] features of the same n examples, got {tuple(x.shape)} and "
                              f"{tuple(y.shape)}")
    x, y = x - x.mean(0), y - y.mean(0)
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T
        cross, norm_x, norm_y = (kx * ky).sum(), kx.norm(), ky.norm()
    else:
        cross, norm_x, norm_y = (y.T @ x).norm() ** 2, (x.T @ x).norm(), (y.T @ y).norm()
    if norm_x == 0 or norm_y == 0:
        raise LayerpruneError("CKA is undefined for constant features")
    return float(cross / (norm_x * norm_y))


@torch.no_grad()
def final_hidden_states(model: nn.Module, calibration, layer: str | int = "last", batch_size: int = 4) -> torch.Tensor:
    """[real tokens, hidden] output of one decoder layer (default the last, BEFORE the final norm: taken with a
    hook, since output_hidden_states returns the post-norm state), padding positions left out."""
    layers = get_anatomy(model).layers
    block = layers[-1] if layer == "last" else layers[layer]
    captured: list[torch.Tensor] = []
    handle = block.register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
    device = model_device(model)
    rows = []
    try:
        for ids, mask in calibration.nonempty_batches(batch_size):
            captured.clear()
            model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            rows.append(captured[-1][mask.to(captured[-1].device).bool()].double().cpu())
    finally:
        handle.remove()
    return torch.cat(rows)


def hidden_state_similarity(
    models: dict[str, nn.Module | Callable[[], nn.Module]], calibration, layer: str | int = "last", batch_size: int = 4
) -> tuple[list[str], list[list[float]]]:
    """(names, matrix) of linear CKA between every pair of models on the same calibration tokens.

    A value may be a function that loads the model: models are then loaded one at a time (only their
    hidden states are kept), so a study of large models fits in memory.
    """
    names = list(models)
    states = {}
    for name in names:
        model = models[name] if isinstance(models[name], nn.Module) else models[name]()
        states[name] = final_hidden_states(model, calibration, layer, batch_size)
        del model
    matrix = [[1.0] * len(names) for _ in names]
    for i, a in enumerate(names):
        for j in range(i + 1, len(names)):
            matrix[i][j] = matrix[j][i] = linear_cka(states[a], states[names[j]])
    return names, matrix


def similarity_stage(path: Path, config: RunConfig, final_models: dict[str, str], log=print) -> Path:
    """Write {"names": ["original", *settings], "cka": matrix} to `path`, on calibration text of `config`.

    Skipped when `path` already compares the same models (a rerun recomputes it only when the set of
    finished settings changed).
    """
    names = ["original", *final_models]
    if (read_json(path, missing_ok=True) or {}).get("names") == names:
        log("similarity.json exists: skipping")
        return path
    log(f"similarity: linear CKA of {len(names)} models")
    run = Run(config, log=log)
    original = run.load(config.model)
    calibration = run.calibration(original.tokenizer, seed_offset=2000)
    # loaders, not models: hidden_state_similarity loads one model at a time
    models = {"original": lambda: original.model}
    models.update({name: (lambda ref=ref: run.load(ref, original).model) for name, ref in final_models.items()})
    names, matrix = hidden_state_similarity(models, calibration)
    return write_json(path, {"names": names, "cka": matrix})
