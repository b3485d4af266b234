"""The [EOT] filter of paper Eq. 5, on any clustering of the latent pixels (ours and the §4.5 baselines).

A cluster is kept when the mean of the min-max normalized [EOT] cross-attention map inside it is strictly
greater than the map's mean over the whole image. The normalization is the released code's (the shift by the
minimum changes which clusters pass; docs/fidelity.md); a constant map normalizes to zeros, so nothing passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["EotFilter", "eot_filter", "min_max"]


@dataclass(frozen=True)
class EotFilter:
    """``kept`` (K,) bool, ``scores`` (K,) float64 mean normalized [EOT] per cluster (left side of Eq. 5),
    ``threshold`` the image mean (right side), ``eot`` (h, w) float64 the normalized map the filter read."""

    kept: Tensor
    scores: Tensor
    threshold: float
    eot: Tensor


def min_max(eot: Tensor | np.ndarray) -> Tensor:
    """(e - min) / (max - min) in float64 on the CPU; a constant map becomes all zeros."""
    e = torch.as_tensor(eot).detach().to(device="cpu", dtype=torch.float64)
    lo, hi = e.min(), e.max()
    if hi > lo:
        return (e - lo) / (hi - lo)
    return torch.zeros_like(e)


def eot_filter(labels: Tensor | np.ndarray, eot: Tensor | np.ndarray, num_clusters: int | None = None) -> EotFilter:
    """Paper Eq. 5 on a clustering.

    Args:
        labels: (h, w) or (h·w,) int cluster index 0..K-1 of every latent pixel.
        eot: (h, w) raw [EOT] cross-attention map (any float dtype); min-max normalized here.
        num_clusters: K (default: ``labels.max() + 1``); an empty cluster scores 0.

    Raises:
        ValueError: ``labels`` and ``eot`` do not have the same number of pixels.
    """
    labels = torch.as_tensor(labels).to(device="cpu", dtype=torch.long).reshape(-1)  # (h·w,)
    e = min_max(eot).reshape(-1)  # (h·w,)
    if labels.shape != e.shape:
        raise ValueError(f"`labels` ({labels.numel()} pixels) and `eot` ({e.numel()} pixels) must cover the same (h, w)")
    k = int(labels.max()) + 1 if num_clusters is None else int(num_clusters)
    sizes = torch.bincount(labels, minlength=k).to(torch.float64)  # (K,)
    sums = e.new_zeros(k).index_add_(0, labels, e)  # (K,)
    scores = torch.where(sizes > 0, sums / sizes.clamp_min(1), torch.zeros_like(sums))
    threshold = float(e.mean())
    return EotFilter(kept=scores > threshold, scores=scores, threshold=threshold, eot=min_max(eot))
