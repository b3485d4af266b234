"""Symmetric KL divergence between attention rows (paper Eq. 3), all pairs from one matrix product.

For distributions a_i, a_j over d bins,

    d(a_i, a_j) = (KL(a_i || a_j) + KL(a_j || a_i)) / 2 = (H_i + H_j - M_ij - M_ji) / 2,

with M = a · log(a)ᵀ and H_i = Σ_k a_ik log a_ik = M_ii. The whole (n, n) matrix therefore costs one
(n, d) × (d, n) product plus O(n²) elementwise work, instead of n² separate divergences. This is the hot path of
concept localization (n = h·w = 4096 rows for a 64×64 latent), so the code keeps exactly one n×n buffer and
symmetrizes it in place, block by block, while the blocks are still in cache.

Zeros: ``log`` is taken of ``max(a, eps)``, so an empty bin costs a finite penalty (a_ik · log eps) instead of
giving ``inf``/``NaN``; 0 · log(eps) = 0 keeps the entropy term exact. Clamping only makes ``log`` monotone
non-decreasing, so each divergence stays a sum of non-negative terms Σ_k (a_ik - a_jk)(log a_ik - log a_jk) / 2
and the result is clipped at 0 against rounding.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import Tensor

__all__ = ["cross_symmetric_kl", "pairwise_symmetric_kl"]

# Side of the square blocks symmetrized together: a pair of 128×128 blocks stays in L1/L2 while both are read and
# written; a whole-matrix ``m + m.T`` walks one operand column-wise and costs ~5x more (measured, n = 4096).
_BLOCK = 128


def _as_distributions(a: Tensor, name: str) -> Tensor:
    if not isinstance(a, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(a).__name__}")
    if a.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D (n, d) rows of distributions, got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {a.dtype}")
    a = a.detach()
    # Half precision cannot hold log(eps) accurately nor accumulate d = 4096 terms: compute in float32.
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    return a.contiguous()


def pairwise_symmetric_kl(a: Tensor, eps: float = 1e-12) -> Tensor:
    """All-pairs mean KL divergence (paper Eq. 3) between the rows of ``a``.

    Args:
        a: (n, d) float tensor whose rows are probability distributions (non-negative, summing to 1; this is
            not checked here). float32 and float64 are computed in their own precision, other float dtypes in
            float32. Exact zeros are allowed.
        eps: floor applied before the logarithm, so that zeros never give NaN or inf.

    Returns:
        (n, n) tensor ``d`` on ``a``'s device with ``d[i, j] = (KL(a_i||a_j) + KL(a_j||a_i)) / 2``: symmetric,
        non-negative, zero diagonal. Memory: one (n, d) log buffer and the (n, n) result.
    """
    a = _as_distributions(a, "a")
    if a.device.type == "cpu":
        return torch.from_numpy(_pairwise_numpy(a.numpy(), eps))
    return _pairwise_torch(a, eps)


def cross_symmetric_kl(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Mean KL divergence (Eq. 3) between every row of ``a`` and every row of ``b``.

    Args:
        a: (n, d) rows that are distributions.
        b: (m, d) rows that are distributions, same d and device as ``a`` (mixed dtypes compute in float64).
        eps: floor applied before the logarithm.

    Returns:
        (n, m) tensor with ``[i, j] = (KL(a_i||b_j) + KL(b_j||a_i)) / 2``, non-negative. Costs two products
        (a·log bᵀ and log a·bᵀ): nothing is shared between the two sides.
    """
    a = _as_distributions(a, "a")
    b = _as_distributions(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"`a` and `b` must have the same number of columns, got {a.shape[1]} and {b.shape[1]}"
        )
    if a.dtype != b.dtype:
        a, b = a.double(), b.double()
    if a.device.type == "cpu":
        a_np, b_np = a.numpy(), b.numpy()
        log_a, log_b = _log_numpy(a_np, eps), _log_numpy(b_np, eps)  # (n, d), (m, d)
        d = a_np @ log_b.T  # (n, m), a_i · log b_j
        d += log_a @ b_np.T  # (n, m), + b_j · log a_i
        h_a = np.einsum("ij,ij->i", a_np, log_a)  # (n,)
        h_b = np.einsum("ij,ij->i", b_np, log_b)  # (m,)
        d -= h_a[:, None]
        d -= h_b[None, :]
        d *= -0.5
        np.maximum(d, 0.0, out=d)
        return torch.from_numpy(d)
    log_a, log_b = a.clamp(min=eps).log(), b.clamp(min=eps).log()
    d = a @ log_b.T + log_a @ b.T  # (n, m)
    h_a, h_b = (a * log_a).sum(-1), (b * log_b).sum(-1)  # (n,), (m,)
    return d.neg_().add_(h_a[:, None]).add_(h_b[None, :]).mul_(0.5).clamp_(min=0.0)


def _pairwise_numpy(a: np.ndarray, eps: float) -> np.ndarray:
    """CPU path, numpy end to end.

    Two measured reasons (2-core AMD CPU, n = d = 4096): numpy's OpenBLAS sgemm is ~15% faster than torch's MKL
    here, and once OpenBLAS has run, its worker threads keep spinning for a while, so torch ops that use torch's
    own thread pool right after it run 5-10x slower; numpy's elementwise ops are single-threaded and unaffected.
    """
    log_a = _log_numpy(a, eps)  # (n, d)
    m = a @ log_a.T  # (n, n), M_ij = a_i · log a_j, one sgemm/dgemm
    del log_a  # free the (n, d) buffer before the O(n²) pass
    h = m.diagonal().copy()  # (n,), H_i = Σ a_i log a_i = M_ii
    n = m.shape[0]

    def symmetrize(i0: int) -> None:
        # Task i0 owns the block pairs {(I, J), (J, I)} with I = i0 ≤ J: tasks read and write disjoint memory.
        i1 = min(i0 + _BLOCK, n)
        h_i = h[i0:i1, None]  # (bi, 1)
        for j0 in range(i0, n, _BLOCK):
            j1 = min(j0 + _BLOCK, n)
            upper = m[i0:i1, j0:j1]  # (bi, bj) view
            lower = m[j0:j1, i0:i1]  # (bj, bi) view
            block = upper + lower.T  # (bi, bj), M_ij + M_ji
            # (H_i + H_j) - (M_ij + M_ji): both sums commute, so diagonal blocks come out exactly symmetric.
            np.subtract(h_i + h[None, j0:j1], block, out=block)
            block *= 0.5
            np.maximum(block, 0.0, out=block)
            upper[...] = block
            lower[...] = block.T

    starts = list(range(0, n, _BLOCK))
    if n >= 1024 and (os.cpu_count() or 1) > 1:
        # numpy releases the GIL in these ufuncs: two threads halve this memory-bound pass on a 2-core CPU.
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(symmetrize, starts))
    else:
        for i0 in starts:
            symmetrize(i0)
    np.fill_diagonal(m, 0.0)
    return m


def _pairwise_torch(a: Tensor, eps: float) -> Tensor:
    """Any-device path (GPU): whole-matrix ops, which are cheap there."""
    log_a = a.clamp(min=eps).log_()  # (n, d)
    m = a @ log_a.T  # (n, n)
    del log_a
    h = m.diagonal().clone()  # (n,)
    d = m + m.T  # (n, n)
    del m
    d = (h[:, None] + h[None, :]).sub_(d).mul_(0.5).clamp_(min=0.0)  # sums commute: exactly symmetric
    d.fill_diagonal_(0.0)
    return d


def _log_numpy(a: np.ndarray, eps: float) -> np.ndarray:
    """log(max(a, eps)) in one fresh buffer (numpy's vectorized log is ~3x faster than torch's on this CPU)."""
    out = np.maximum(a, eps)
    np.log(out, out=out)
    return out
