"""The in-place Cholesky solve of the least-squares healing (`replace`) against the LU solve it replaced."""

import copy

import pytest
import torch

from layerprune import remove_layers
from layerprune.errors import LayerpruneError
from layerprune.finetune import local
from layerprune.finetune.local import LeastSquares, fit_cut
from layerprune.finetune.normal_equations import cholesky_lower_in_place, restore_lower, solve_normal_equations
from tiny_models import tiny_input, tiny_model


def lu_solve(gram: torch.Tensor, rhs: torch.Tensor, ridge: float = 1e-9) -> torch.Tensor:
    """The solve `replace` used before: the same ridge, torch.linalg.solve (LU on a copy)."""
    gram = gram.clone()
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    return torch.linalg.solve(gram, rhs)


def system(tokens: int, n: int, k: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    m = torch.randn(tokens, n, generator=generator, dtype=torch.float64)
    r = torch.randn(tokens, k, generator=generator, dtype=torch.float64)
    gram = m.T @ m
    return (gram + gram.T) / 2, m.T @ r  # exactly symmetric (a product's rounding need not be)


@pytest.mark.parametrize("n,block", [(7, 3), (64, 64), (100, 16), (130, 32)])
def test_blocked_cholesky_is_the_lower_factor_and_leaves_the_upper_triangle(n, block):
    gram, _ = system(3 * n, n, 1)
    original = gram.clone()
    assert cholesky_lower_in_place(gram, block) == 0
    assert torch.allclose(gram.tril(), torch.linalg.cholesky(original), atol=1e-10)
    assert torch.equal(gram.triu(1), original.triu(1))


def test_the_solve_is_in_place_and_matches_the_lu_solve():
    gram, rhs = system(500, 120, 9)
    expected = lu_solve(gram, rhs)
    out = solve_normal_equations(gram, rhs, block=32)
    assert out.data_ptr() == rhs.data_ptr()
    assert torch.allclose(out, expected, rtol=1e-9, atol=1e-12)


def test_an_ill_conditioned_rank_deficient_system_matches_the_lu_solve():
    """Fewer tokens than dimensions (as 64 rows of 256 tokens against a 28672-wide MLP) and columns scaled over
    six orders of magnitude (outlier features): the tiny ridge decides the null space in both solves."""
    generator = torch.Generator().manual_seed(1)
    m = torch.randn(40, 100, generator=generator, dtype=torch.float64) * torch.logspace(-3, 3, 100,
                                                                                      dtype=torch.float64)
    r = torch.randn(40, 5, generator=generator, dtype=torch.float64)
    gram, rhs = m.T @ m, m.T @ r
    expected = lu_solve(gram, rhs)
    got = solve_normal_equations(gram.clone(), rhs.clone(), block=16)
    assert torch.linalg.norm(got - expected) / torch.linalg.norm(expected) < 1e-4
    assert torch.allclose(m @ got, m @ expected, rtol=1e-6, atol=1e-8)  # the same fit of the targets


def test_a_system_that_is_not_positive_definite_retries_with_a_larger_ridge():
    """A negative eigenvalue of 1e-8 x the mean diagonal (rounding in a rank-deficient gram): the first
    factorisation fails, the gram is rebuilt from its upper triangle, and the ridge of 1e-7 solves it."""
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    eigenvalues = torch.linspace(1.0, 2.0, 50, dtype=torch.float64)
    eigenvalues[0] = -1e-8 * eigenvalues.mean()
    gram = q @ torch.diag(eigenvalues) @ q.T
    gram = (gram + gram.T) / 2
    rhs = torch.randn(50, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    expected = lu_solve(gram, rhs, ridge=1e-7)
    assert cholesky_lower_in_place(gram.clone(), 16) > 0
    got = solve_normal_equations(gram.clone(), rhs.clone(), block=16)
    assert torch.allclose(got, expected, rtol=1e-6)


def test_restore_lower_rebuilds_the_matrix():
    gram, _ = system(60, 40, 1)
    original = gram.clone()
    gram.tril_().mul_(-3)  # a failed factorisation's lower triangle
    gram.add_(original.triu(1))
    restore_lower(gram, original.diagonal().clone(), block=16)
    assert torch.equal(gram, original)


def test_nan_hidden_states_refuse_in_one_line():
    gram, rhs = system(30, 10, 2)
    gram[3, 3] = float("nan")
    with pytest.raises(LayerpruneError, match="not positive definite"):
        solve_normal_equations(gram, rhs)


def test_replace_on_a_tiny_model_matches_the_lu_solve(monkeypatch):
    """fit_cut's map with the in-place Cholesky solve equals the old LU solve of the same normal equations."""
    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    remove_layers(student, [2, 3], how={"chosen_by": "test"})
    ids = tiny_input(batch=6, length=16, seed=0)
    rows = [{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids]
    systems = []

    def keep(self):
        systems.append((self.gram.clone(), self.rhs.clone()))
        return original(self)

    original = LeastSquares.solve
    monkeypatch.setattr(local.LeastSquares, "solve", keep)
    _, t_map, _ = fit_cut(student, teacher, 2, 3, rows, pad_id=0, batch_size=4)
    expected = lu_solve(*systems[0]).float()
    assert torch.allclose(t_map, expected, rtol=1e-4, atol=1e-5)
