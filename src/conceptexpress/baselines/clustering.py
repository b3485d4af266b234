"""Fixed-count clustering baselines of paper §4.5 (Table 3, Fig. 7): k-means and plain FINCH reduced to k clusters.

Both cluster the *same* aggregated self-attention rows as ours (``ConceptLocalizer.attention``) and then apply
the *same* [EOT] filter (Eq. 5), "for fair comparison" (paper §4.5). Pure functions on tensors/arrays: no
diffusers import; scikit-learn (the ``[eval]`` extra) is imported only inside :func:`kmeans_concepts`.

The filter is the one ``cluster_concepts`` applies: :func:`conceptexpress.localize.eot_filter`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from conceptexpress.localize import FinchLevel, eot_filter, finch, pairwise_symmetric_kl

__all__ = [
    "BaselineClusters",
    "finch_fixed_concepts",
    "finch_fixed_labels",
    "finch_levels",
    "kmeans_concepts",
]


@dataclass(frozen=True)
class BaselineClusters:
    """Result of a fixed-count baseline on one image.

    Attributes:
        masks: (M, h, w) bool masks of the clusters that pass the [EOT] filter, disjoint, ordered by cluster
            index (= by first pixel in raster order). M <= k.
        labels: (h, w) int64 cluster index of every latent pixel *before* the filter, 0..num_clusters-1,
            numbered by first pixel in raster order.
        num_clusters: clusters before the filter: exactly k unless the input cannot give k (see ``messages``).
        kept: (num_clusters,) bool, True for clusters that pass the filter (Eq. 5).
        scores: (num_clusters,) float64 mean normalized [EOT] value inside each cluster.
        threshold: mean normalized [EOT] value over the image (right side of Eq. 5).
        messages: notes on fallbacks (fewer than k clusters available).
    """

    masks: np.ndarray
    labels: np.ndarray
    num_clusters: int
    kept: np.ndarray
    scores: np.ndarray
    threshold: float
    messages: tuple[str, ...] = ()


def kmeans_concepts(
    attn: Tensor, eot: Tensor, k: int, seed: int = 0, *, n_init: int = 10
) -> BaselineClusters:
    """k-means (Euclidean, scikit-learn) on the attention rows, then the [EOT] filter (paper §4.5 baseline).

    Args:
        attn: (h·w, h·w) aggregated self-attention, one row per latent pixel (raster order).
        eot: (h, w) raw [EOT] map.
        k: number of clusters, 1 <= k <= h·w.
        seed: ``random_state`` of k-means++ initialization; equal seeds give equal results.
        n_init: k-means restarts (the best inertia wins); fixed so that results do not depend on the
            scikit-learn version's default.

    Raises:
        ImportError: scikit-learn is missing (install ``conceptexpress[eval]``).
    """
    try:
        from sklearn.cluster import KMeans
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the k-means baseline needs scikit-learn: pip install 'conceptexpress[eval]'"
        ) from e

    h, w = _check(attn, eot, k)
    rows = attn.detach().cpu().float().numpy()  # (h·w, h·w)
    km = KMeans(n_clusters=k, n_init=n_init, random_state=seed, algorithm="lloyd")
    labels = km.fit_predict(rows)  # (h·w,)
    messages = []
    if len(np.unique(labels)) < k:
        messages.append(
            f"k-means: only {len(np.unique(labels))} distinct clusters for k={k} (duplicate rows)"
        )
    return _finish(labels, h, w, eot, messages)


def finch_levels(attn: Tensor, stop: str = "design") -> list[FinchLevel]:
    """Plain FINCH hierarchy (Eq. 2) with the symmetric KL of Eq. 3 on the attention rows, finest first.

    With the default ``stop`` this is the same call as our pre-clustering, so ours and this baseline start from
    the same hierarchy; ``stop="finch-clust"`` gives ``finch-clust``'s levels (see ``conceptexpress.localize.finch``).
    Compute it once per image and pass it to :func:`finch_fixed_concepts` for every k.
    """
    work = attn.detach()
    work = work if work.dtype == torch.float64 else work.float()
    return finch(work, pairwise_symmetric_kl, stop=stop)


def finch_fixed_labels(
    attn: Tensor, k: int, levels: list[FinchLevel] | None = None
) -> tuple[np.ndarray, list[str]]:
    """(h·w,) int64 FINCH labels reduced to exactly k clusters, as ``finch-clust``'s ``req_clust`` does.

    From the coarsest level with >= k clusters, merge the closest pair of cluster means (symmetric KL, Eq. 3;
    first pair in row-major order on ties) one pair at a time, each merged mean being the mean of all its
    original rows, until k clusters remain. If even the finest level has fewer than k clusters, that level is
    returned with a message (``finch-clust`` does the same).
    """
    if levels is None:
        levels = finch_levels(attn)
    messages: list[str] = []
    candidates = [lv for lv in levels if lv.num_clusters >= k]
    if not candidates:
        finest = levels[0]
        messages.append(f"FINCH: the finest level has {finest.num_clusters} clusters < k={k}; using it")
        return finest.labels.cpu().numpy().astype(np.int64), messages
    level = candidates[-1]
    labels = level.labels.cpu().numpy().astype(np.int64)  # (n,)
    means = level.means.detach().cpu().clone()  # (k', d) mean of the original rows; clone: edited in place
    sizes = torch.bincount(level.labels.cpu(), minlength=level.num_clusters).to(means.dtype)  # (k',)
    ids = np.arange(level.num_clusters)  # current cluster -> label value it carries
    while means.shape[0] > k:
        d = pairwise_symmetric_kl(means)  # (c, c)
        d.fill_diagonal_(float("inf"))
        flat = int(torch.argmin(d))  # first minimum in row-major order
        i, j = sorted(divmod(flat, d.shape[1]))
        merged = (means[i] * sizes[i] + means[j] * sizes[j]) / (sizes[i] + sizes[j])  # mean of all rows
        means[i], sizes[i] = merged, sizes[i] + sizes[j]
        labels[labels == ids[j]] = ids[i]
        keep = torch.arange(means.shape[0]) != j
        means, sizes, ids = means[keep], sizes[keep], ids[keep.numpy()]
    return labels, messages


def finch_fixed_concepts(
    attn: Tensor, eot: Tensor, k: int, *, levels: list[FinchLevel] | None = None
) -> BaselineClusters:
    """Plain FINCH (symmetric KL) reduced to exactly k clusters, then the [EOT] filter (paper §4.5 baseline).

    Args:
        attn: (h·w, h·w) aggregated self-attention, rows are distributions.
        eot: (h, w) raw [EOT] map.
        k: number of clusters, 1 <= k <= h·w.
        levels: the hierarchy from :func:`finch_levels` on the same ``attn``, to share it between several k.
    """
    h, w = _check(attn, eot, k)
    labels, messages = finch_fixed_labels(attn, k, levels)
    return _finish(labels, h, w, eot, messages)


def _finish(labels: np.ndarray, h: int, w: int, eot: Tensor, messages: list[str]) -> BaselineClusters:
    """Renumber by first pixel, filter (Eq. 5), and cut the kept clusters into masks."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    label_map = rank[inverse.reshape(-1)].reshape(h, w)  # (h, w)
    filtered = eot_filter(label_map, eot)
    kept, scores, threshold = filtered.kept.numpy(), filtered.scores.numpy(), filtered.threshold
    kept_ids = np.nonzero(kept)[0]
    masks = label_map[None] == kept_ids[:, None, None]  # (M, h, w)
    return BaselineClusters(
        masks=masks,
        labels=label_map,
        num_clusters=len(first),
        kept=kept,
        scores=scores,
        threshold=threshold,
        messages=tuple(messages),
    )


def _check(attn: Tensor, eot: Tensor, k: int) -> tuple[int, int]:
    if not isinstance(attn, Tensor) or not isinstance(eot, Tensor):
        raise ValueError(
            f"`attn` and `eot` must be torch tensors, got {type(attn).__name__}, {type(eot).__name__}"
        )
    if eot.ndim != 2:
        raise ValueError(f"`eot` must be an (h, w) map, got shape {tuple(eot.shape)}")
    h, w = eot.shape
    if tuple(attn.shape) != (h * w, h * w):
        raise ValueError(f"`attn` must be ({h * w}, {h * w}) for a {h}x{w} `eot`, got {tuple(attn.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= h * w:
        raise ValueError(f"`k` must be an integer in [1, {h * w}], got {k!r}")
    return h, w
