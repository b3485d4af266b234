"""Pairwise symmetric KL (paper Eq. 3): one-product formula vs the naive per-pair definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conceptexpress.localize import cross_symmetric_kl, pairwise_symmetric_kl
from conceptexpress.localize.kl import _pairwise_torch

EPS = 1e-12


def _dirichlet_rows(n: int, d: int, seed: int, zero_fraction: float = 0.2) -> torch.Tensor:
    """(n, d) float64 distributions with some exact zeros (and one row that is a single spike)."""
    rng = np.random.default_rng(seed)
    a = rng.dirichlet(np.full(d, 0.5), size=n)  # (n, d)
    a[rng.random((n, d)) < zero_fraction] = 0.0
    a[0] = 0.0
    a[0, 3] = 1.0  # a one-hot row: the most zeros a row can have
    a /= a.sum(1, keepdims=True)
    return torch.from_numpy(a)


def _naive_kl(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) = sum over p > 0 of p (log p - log max(q, eps)): the definition, one pair at a time."""
    nz = p > 0
    return float(np.sum(p[nz] * (np.log(p[nz]) - np.log(np.maximum(q[nz], EPS)))))


def _naive_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([[(_naive_kl(p, q) + _naive_kl(q, p)) / 2 for q in b] for p in a])


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_naive_per_pair_definition(seed):
    a = _dirichlet_rows(40, 25, seed)
    d = pairwise_symmetric_kl(a, eps=EPS)
    assert d.shape == (40, 40) and d.dtype == torch.float64
    assert torch.isfinite(d).all()
    np.testing.assert_allclose(d.numpy(), _naive_matrix(a.numpy(), a.numpy()), rtol=1e-10, atol=1e-10)
    assert torch.equal(d, d.T)
    assert torch.all(d.diagonal() == 0)
    assert torch.all(d >= 0)


def test_block_boundaries_and_float32():
    """n not a multiple of the symmetrization block, float32 in -> float32 out, close to float64."""
    a64 = _dirichlet_rows(300, 64, seed=2)
    d64 = pairwise_symmetric_kl(a64)
    d32 = pairwise_symmetric_kl(a64.float())
    assert d32.dtype == torch.float32
    assert torch.equal(d32, d32.T) and torch.all(d32.diagonal() == 0) and torch.isfinite(d32).all()
    np.testing.assert_allclose(d32.double().numpy(), d64.numpy(), rtol=1e-4, atol=1e-4)


def test_torch_path_matches_numpy_path():
    """The any-device (GPU) path computes the same matrix as the CPU path."""
    a = _dirichlet_rows(50, 30, seed=3)
    np.testing.assert_allclose(_pairwise_torch(a, EPS).numpy(), pairwise_symmetric_kl(a).numpy(), atol=1e-12)


def test_identical_rows_are_at_distance_zero_and_input_untouched():
    a = _dirichlet_rows(5, 10, seed=4)
    a = torch.cat([a, a[:2]])  # rows 5, 6 duplicate rows 0, 1
    before = a.clone()
    d = pairwise_symmetric_kl(a)
    assert torch.equal(a, before)
    assert abs(float(d[0, 5])) < 1e-12 and abs(float(d[1, 6])) < 1e-12


def test_cross_variant():
    a, b = _dirichlet_rows(12, 20, seed=5), _dirichlet_rows(7, 20, seed=6)
    np.testing.assert_allclose(
        cross_symmetric_kl(a, b).numpy(), _naive_matrix(a.numpy(), b.numpy()), atol=1e-10
    )
    np.testing.assert_allclose(cross_symmetric_kl(a, a).numpy(), pairwise_symmetric_kl(a).numpy(), atol=1e-10)


def test_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        pairwise_symmetric_kl(torch.ones(3))
    with pytest.raises(ValueError, match="floating-point"):
        pairwise_symmetric_kl(torch.ones(3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="same number of columns"):
        cross_symmetric_kl(torch.ones(2, 3) / 3, torch.ones(2, 4) / 4)
