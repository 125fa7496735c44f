"""Least squares by the normal equations in the memory of one Gram matrix: (G + lambda I) X = R solved in place.

`G` (n x n, symmetric positive semi-definite, fp64) is factored G = L L^T block by block into its own lower
triangle; its strict upper triangle is neither read nor written, so it still holds G and, with the diagonal
saved beforehand (n values), G can be rebuilt when the factorisation meets a pivot that is not positive (a
rank-deficient G, rounding): the ridge lambda then grows x100 and the factorisation starts again. `R` (n x k)
becomes X by two triangular solves in place. Extra memory: one block column (n x `block`) and the n saved
diagonal values; `torch.linalg.solve` would add an LU copy of G and a new X, `torch.linalg.cholesky` a copy of G.
"""

from __future__ import annotations

import torch

from layerprune.errors import LayerpruneError

BLOCK = 1024  # columns per block: n x 1024 fp64 is 224 MiB for a 28672-wide system
RIDGE = 1e-9  # x the mean of the diagonal, added before the first factorisation (as the LU solve did)
RIDGE_GROWTH = 100.0
RETRIES = 4  # ridge up to 1e-1 x the mean diagonal


def solve_normal_equations(gram: torch.Tensor, rhs: torch.Tensor, ridge: float = RIDGE,
                           block: int = BLOCK) -> torch.Tensor:
    """X with (gram + lambda I) X = rhs, lambda = `ridge` x mean(diag(gram)) (grown x100 while gram + lambda I
    is not numerically positive definite). In place: gram's lower triangle becomes the Cholesky factor and
    rhs becomes X (returned); no n x n copy is made."""
    diagonal = gram.diagonal().clone()
    scale = float(diagonal.mean()) or 1.0
    for attempt in range(RETRIES + 1):
        gram.diagonal().copy_(diagonal + ridge * RIDGE_GROWTH ** attempt * scale)
        if cholesky_lower_in_place(gram, block) == 0:
            break
        if attempt == RETRIES:
            raise LayerpruneError("the least-squares system is not positive definite even with a ridge of "
                                  f"{ridge * RIDGE_GROWTH ** attempt:g} x its mean diagonal (NaN or inf in the "
                                  "hidden states?)")
        restore_lower(gram, diagonal, block)
    torch.linalg.solve_triangular(gram, rhs, upper=False, out=rhs)  # L Y = R; reads the lower triangle only
    torch.linalg.solve_triangular(gram.mT, rhs, upper=True, out=rhs)  # L^T X = Y
    return rhs


def cholesky_lower_in_place(a: torch.Tensor, block: int = BLOCK) -> int:
    """Overwrite the lower triangle (diagonal included) of symmetric `a` with its Cholesky factor, reading and
    writing nothing above the diagonal. Returns 0, or the 1-based column at which `a` is found not positive
    definite (its lower triangle is then partly overwritten: see restore_lower)."""
    n = a.shape[0]
    for k in range(0, n, block):
        e = min(k + block, n)
        factor, info = torch.linalg.cholesky_ex(_mirrored(a[k:e, k:e]))
        if int(info):
            return k + int(info)
        _write_lower(a[k:e, k:e], factor)
        if e == n:
            break
        panel = torch.linalg.solve_triangular(factor.mT, a[e:, k:e], upper=True, left=False)  # P L^-T
        a[e:, k:e].copy_(panel)
        for j in range(e, n, block):  # the trailing lower triangle minus panel panel^T, block row by block row
            f = min(j + block, n)
            rows = panel[j - e:f - e]
            if j > e:
                a[j:f, e:j].addmm_(rows, panel[:j - e].mT, alpha=-1)
            _write_lower(a[j:f, j:f], a[j:f, j:f] - rows @ rows.mT)
    return 0


def restore_lower(a: torch.Tensor, diagonal: torch.Tensor, block: int = BLOCK) -> None:
    """Rebuild symmetric `a`'s lower triangle from its strict upper triangle and the saved `diagonal`."""
    n = a.shape[0]
    for k in range(0, n, block):
        e = min(k + block, n)
        a[e:, k:e].copy_(a[k:e, e:].mT)
        _write_lower(a[k:e, k:e], a[k:e, k:e].mT)
    a.diagonal().copy_(diagonal)


def _mirrored(square: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower triangle is `square`'s (a new block-sized tensor)."""
    return square.tril() + square.tril(-1).mT


def _write_lower(square: torch.Tensor, values: torch.Tensor) -> None:
    """Copy `values`' lower triangle (diagonal included) into `square`, leaving its strict upper triangle."""
    lower = torch.ones(square.shape, dtype=torch.bool, device=square.device).tril()
    square.copy_(torch.where(lower, values, square))
