"""Automatic latent concept localization (paper §3.2): pre-clustering, [EOT] filtering, constrained post-clustering.

Pure functions on tensors: the inputs are the aggregated self-attention A (row-stochastic, (h·w, h·w)) and the
[EOT] cross-attention map e (h, w); the output is one binary latent mask and one centroid per concept. The
decisions the paper leaves open follow docs/fidelity.md and are recorded where they are made.

Two modes (docs/fidelity.md L11, L13, L15, L16):

- ``clustering="released"`` (default) reproduces the partition of the authors' released code, which produced the
  published numbers: δ = max d_ij · adj_ij with adj = (A + I)(A + I)ᵀ over the round that produced the pre-level
  (none when that level is the first partition), a round that reduces the count by exactly one ends FINCH (kept),
  and merged clusters are the *unweighted* means of their members' rows, which are also the final features.
- ``clustering="paper"``: δ = the largest distance over the pairs of that round (the first partition included),
  FINCH runs while a round reduces the count, merged means are pixel-weighted, so the centroids are Eq. 6.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from .eot_filter import eot_filter
from .finch import FinchLevel, LinkFilter, StopRule, finch, single_torch_thread
from .kl import pairwise_symmetric_kl

__all__ = ["CLUSTERINGS", "Clustering", "ConceptClusters", "cluster_concepts"]

Clustering = Literal["released", "paper"]
CLUSTERINGS: tuple[str, ...] = ("released", "paper")

# Row sums of a float32 attention aggregated over 16 layers stay within ~1e-5 of 1; 1e-3 only catches inputs
# that were never row-normalized.
_ROW_SUM_TOL = 1e-3


@dataclass(frozen=True)
class ConceptClusters:
    """Result of ``cluster_concepts``: the concepts and every intermediate a stages picture needs.

    N is the number of concepts, N' the number of pre-clusters. All tensors are on the CPU.

    Attributes:
        masks: (N, h, w) bool latent mask m_i of each concept, disjoint, ordered by first pixel in raster order.
        centroids: (N, h·w) float32 feature f_i of each concept. ``clustering="paper"``: f_i = m_i·A / |m_i|
            (Eq. 6), the mean attention row over the mask; ``"released"``: the unweighted mean of the mean rows of
            the pre-clusters merged into the concept (equal to Eq. 6 when they have equal sizes).
        pre_labels: (h, w) int64 pre-cluster index (0..N'-1) of every latent pixel, at the selected level.
        kept: (N',) bool, True for the pre-clusters that pass the [EOT] filter (Eq. 5).
        post_labels: (h, w) int64 concept index of every pixel, -1 for pixels of filtered pre-clusters.
        scores: (N',) float32 mean of the normalized [EOT] map inside each pre-cluster (left side of Eq. 5).
        threshold: mean of the normalized [EOT] map over the image (right side of Eq. 5).
        eot: (h, w) float32 the min-max normalized [EOT] map the filter read.
        delta: δ of the round that produced the selected pre-clustering level (``FinchLevel.max_adjacency_distance``
            for ``clustering="released"``, ``max_link_distance`` for ``"paper"``); the post-clustering drops
            pairs farther apart than this. None when no δ applies: ``"released"`` at the first partition (the
            released code passes ``min_sim=None`` there), or ``delta_constraint=False``.
        pre_level: index of the selected level in ``levels``.
        levels: number of clusters of every level of the pre-clustering hierarchy, finest first.
        messages: human-readable notes on fallbacks taken (empty when everything went the normal way).
        clustering: the mode that produced this result, ``"released"`` or ``"paper"``.
    """

    masks: Tensor
    centroids: Tensor
    pre_labels: Tensor
    kept: Tensor
    post_labels: Tensor
    scores: Tensor
    threshold: float
    eot: Tensor
    delta: float | None
    pre_level: int
    levels: tuple[int, ...]
    messages: tuple[str, ...]
    clustering: str = "released"

    @property
    def num_concepts(self) -> int:
        """N, the number of concepts found (0 when nothing in the image is salient)."""
        return int(self.masks.shape[0])


def cluster_concepts(
    attn: Tensor,
    eot: Tensor,
    n_max: int = 10,
    *,
    clustering: Clustering = "released",
    delta_constraint: bool = True,
    adjacency_constraint: bool = True,
    stop: StopRule | None = None,
    eps: float = 1e-12,
) -> ConceptClusters:
    """Locate the concepts of one image from its self-attention and [EOT] attention (paper §3.2).

    Args:
        attn: (h·w, h·w) aggregated self-attention A, rows in raster order, each row a distribution (non-negative,
            summing to 1). float64 is clustered in float64, anything else in float32. Any device.
        eot: (h, w) raw [EOT] cross-attention map e at latent resolution; min-max normalized here (docs/fidelity.md, "Concept localization").
        n_max: N_max, the upper limit of the number of concepts; selects the pre-clustering level.
        clustering: ``"released"`` (default: the authors' code, which produced the published numbers) or
            ``"paper"`` (Eq. 6 centroids and the package's δ and stop rule); see the module docstring.
        delta_constraint: post-clustering drops links longer than δ (paper constraint 1). Off: ablation only.
        adjacency_constraint: post-clustering drops links between masks that do not touch under 4-connectivity
            (paper constraint 2). Off: ablation only.
        stop: FINCH stopping rule for both clusterings (see ``finch``); None = the mode's own, ``"original"``
            for ``"released"``, ``"design"`` for ``"paper"``.
        eps: floor applied before the logarithm of the KL divergence (zeros in ``attn`` are allowed).

    Returns:
        A ``ConceptClusters``; N = 0 with a message (never an exception) when no region is salient.

    Raises:
        ValueError: on a shape mismatch, a non-square ``attn``, NaN/inf, negative or non-normalized rows,
            ``n_max`` < 2, or an unknown ``clustering``.
    """
    if clustering not in CLUSTERINGS:
        raise ValueError(f"`clustering` must be 'released' or 'paper', got {clustering!r}")
    released = clustering == "released"
    if stop is None:
        stop = "original" if released else "design"
    # Everything but the KL products (numpy/OpenBLAS) is small bookkeeping: one torch thread (see finch.py).
    device = attn.device if isinstance(attn, Tensor) else torch.device("cpu")
    with single_torch_thread(device):
        h, w = _validate(attn, eot, n_max)
        return _cluster(attn, eot, h, w, n_max, released, delta_constraint, adjacency_constraint, stop, eps)


def _cluster(
    attn: Tensor,
    eot: Tensor,
    h: int,
    w: int,
    n_max: int,
    released: bool,
    delta_constraint: bool,
    adjacency_constraint: bool,
    stop: StopRule,
    eps: float,
) -> ConceptClusters:
    messages: list[str] = []
    work = attn.detach()
    if work.dtype != torch.float64:
        work = work.float()
    kl = lambda rows: pairwise_symmetric_kl(rows, eps)  # noqa: E731

    # (1) Pre-clustering: FINCH with the symmetric KL of Eq. 3-4 on the h·w attention rows.
    hierarchy = finch(work, kl, stop=stop)
    counts = tuple(level.num_clusters for level in hierarchy)
    pre_index = _select_level(counts, n_max, messages)
    pre = hierarchy[pre_index]
    del hierarchy
    pre_labels = pre.labels.cpu()  # (h·w,)
    num_pre = pre.num_clusters
    delta = _delta(pre, pre_index, released, delta_constraint, messages)

    # (2) Filter (Eq. 5) on the min-max normalized [EOT] map: keep a cluster whose mean strictly exceeds the
    # image mean (a constant map normalizes to zeros, so nothing passes).
    sizes = torch.bincount(pre_labels, minlength=num_pre).to(torch.float64)  # (N',) pixels per pre-cluster
    filtered = eot_filter(pre_labels, eot, num_pre)
    e, scores, threshold, kept = filtered.eot, filtered.scores, filtered.threshold, filtered.kept  # kept: (N',)
    if float(e.max()) == 0.0:
        messages.append("the [EOT] map is constant: no region is more salient than the rest")

    # (3) Post-clustering: FINCH on the kept clusters' mean rows with the δ and adjacency constraints. "paper"
    # weights them by their sizes, so that merged means are means over all their pixels (Eq. 6); "released"
    # averages them unweighted, as the released code's cool_mean over the kept clusters' rows.
    kept_ids = torch.nonzero(kept).reshape(-1)  # (K,) pre-cluster index of each kept cluster
    sample_of_pre = torch.full((num_pre,), -1, dtype=torch.long)
    sample_of_pre[kept_ids] = torch.arange(len(kept_ids))
    pixel_sample = sample_of_pre[pre_labels].reshape(h, w)  # (h, w) kept-cluster index, -1 if filtered
    if len(kept_ids):
        post = _post_cluster(
            pre.means[kept_ids.to(pre.means.device)],
            None if released else sizes[kept_ids],
            pixel_sample,
            delta,
            adjacency_constraint,
            stop,
            kl,
        )
        post_labels, order = _concept_labels(pixel_sample, post)
        centroids = post.means[order.to(post.means.device)].float().cpu()  # (N, h·w), Eq. 6 for "paper"
    else:
        messages.append(
            f"no concept found: none of the {num_pre} pre-clusters has a mean [EOT] value above the image "
            f"mean {threshold:.4f}"
        )
        post_labels = torch.full((h, w), -1, dtype=torch.long)
        centroids = torch.zeros(0, h * w, dtype=torch.float32)

    # (4) One mask per concept, concepts ordered by their first pixel in raster order.
    masks = post_labels[None] == torch.arange(centroids.shape[0])[:, None, None]  # (N, h, w)
    return ConceptClusters(
        masks=masks,
        centroids=centroids,
        pre_labels=pre_labels.reshape(h, w),
        kept=kept,
        post_labels=post_labels,
        scores=scores.float(),
        threshold=threshold,
        eot=e.float(),
        delta=delta,
        pre_level=pre_index,
        levels=counts,
        messages=tuple(messages),
        clustering="released" if released else "paper",
    )


def _delta(
    pre: FinchLevel, pre_index: int, released: bool, delta_constraint: bool, messages: list[str]
) -> float | None:
    """δ of the post-clustering constraint (paper §3.2), None when no δ applies.

    "released": max d_ij · adj_ij over the round that produced the pre-level (adj = (A + I)(A + I)ᵀ counts a
    mutual first-neighbour pair twice), and no δ at the first partition, whose δ the released code leaves None.
    "paper": the largest distance over that round's pairs, the first partition included.
    """
    if not delta_constraint:
        return None
    if not released:
        return pre.max_link_distance
    if pre_index == 0:
        messages.append(
            "pre-clustering: the selected level is the first partition, for which the released code defines no δ; "
            "post-clustering runs without the δ constraint (clustering='paper' computes one)"
        )
        return None
    return pre.max_adjacency_distance


def _post_cluster(
    centroids: Tensor,
    sizes: Tensor | None,
    pixel_sample: Tensor,
    delta: float | None,
    adjacency: bool,
    stop: StopRule,
    distance: Callable[[Tensor], Tensor],
) -> FinchLevel:
    """Constrained FINCH over the kept pre-clusters; the last level wins (the first round is always a level).

    ``sizes`` (K,) weight the merged means by pixel count (Eq. 6); None averages the pre-cluster rows unweighted.
    """
    levels = finch(
        centroids,
        distance,
        weights=sizes,
        max_link_distance=delta,
        link_filter=_touching_filter(pixel_sample) if adjacency else None,
        stop=stop,
    )
    return levels[-1]


def _concept_labels(pixel_sample: Tensor, post: FinchLevel) -> tuple[Tensor, Tensor]:
    """(h, w) concept index per pixel (-1 = filtered) numbered in raster order of first pixels, and the (N,) post
    cluster of concept 0, 1, ..."""
    h, w = pixel_sample.shape
    sample_cluster = post.labels.cpu()  # (K,)
    cluster = torch.where(pixel_sample >= 0, sample_cluster[pixel_sample.clamp(min=0)], -1).reshape(
        -1
    )  # (h·w,)
    order = _first_appearance_order(cluster, post.num_clusters)  # (N,)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order))
    return torch.where(cluster >= 0, rank[cluster.clamp(min=0)], -1).reshape(h, w), order


def _touching_filter(pixel_sample: Tensor) -> LinkFilter:
    """Link predicate: keep src—dst only if the two current masks share a 4-connected pixel border."""

    def keep(src: Tensor, dst: Tensor, labels: Tensor) -> Tensor:
        labels = labels.cpu()
        cur = torch.where(pixel_sample >= 0, labels[pixel_sample.clamp(min=0)], -1)  # (h, w) current cluster
        touch = _touching_pairs(cur, int(labels.max()) + 1)  # (k, k)
        return touch[src.cpu(), dst.cpu()]

    return keep


def _touching_pairs(label_map: Tensor, k: int) -> Tensor:
    """(k, k) bool: True where two different labels (>= 0) of ``label_map`` are 4-adjacent somewhere."""
    touch = torch.zeros(k, k, dtype=torch.bool)
    for a, b in ((label_map[:, :-1], label_map[:, 1:]), (label_map[:-1, :], label_map[1:, :])):
        border = (a >= 0) & (b >= 0) & (a != b)
        touch[a[border], b[border]] = True
        touch[b[border], a[border]] = True
    return touch


def _select_level(counts: tuple[int, ...], n_max: int, messages: list[str]) -> int:
    """The first level with >= n_max clusters whose next level has fewer (counts decrease strictly after the
    first level, so: the coarsest level with >= n_max); the finest level, with a message, if none has."""
    candidates = [i for i, c in enumerate(counts) if c >= n_max]
    if not candidates:
        messages.append(
            f"pre-clustering: no level has >= n_max={n_max} clusters (finest level has {counts[0]}); "
            "using the finest level"
        )
        return 0
    return candidates[-1]


def _first_appearance_order(labels: Tensor, k: int) -> Tensor:
    """(k,) the labels in order of their first occurrence in ``labels`` (entries < 0 ignored)."""
    n = labels.shape[0]
    first = torch.full((k,), n, dtype=torch.long)
    valid = labels >= 0
    first.scatter_reduce_(0, labels[valid], torch.nonzero(valid).reshape(-1), reduce="amin")
    return torch.argsort(first, stable=True)


def _row_sums_and_min(attn: Tensor) -> tuple[Tensor, float]:
    """Row sums and minimum of A; in numpy on CPU, where both take ~5 ms for 4096² float32 (torch: ~10x more).

    Sums stay in the input precision: numpy sums a contiguous row pairwise (relative error ~1e-7 for float32),
    far below the tolerance they are checked against.
    """
    if attn.device.type == "cpu" and attn.dtype in (torch.float32, torch.float64):
        a = attn.numpy()
        return torch.from_numpy(a.sum(axis=1)), float(a.min())
    wide = torch.float64 if attn.dtype == torch.float64 else torch.float32  # half sums would round at 1e-3
    return attn.sum(dim=1, dtype=wide).cpu(), float(attn.min())


def _validate(attn: Tensor, eot: Tensor, n_max: int) -> tuple[int, int]:
    if not isinstance(attn, Tensor) or not isinstance(eot, Tensor):
        raise ValueError(
            f"`attn` and `eot` must be torch tensors, got {type(attn).__name__} and {type(eot).__name__}"
        )
    if isinstance(n_max, bool) or not isinstance(n_max, int) or n_max < 2:
        raise ValueError(f"`n_max` must be an integer >= 2, got {n_max!r}")
    if eot.ndim != 2:
        raise ValueError(f"`eot` must be an (h, w) map, got shape {tuple(eot.shape)}")
    h, w = eot.shape
    if attn.ndim != 2 or attn.shape[0] != attn.shape[1]:
        raise ValueError(f"`attn` must be a square (h*w, h*w) matrix, got shape {tuple(attn.shape)}")
    if attn.shape[0] != h * w:
        raise ValueError(
            f"`attn` has {attn.shape[0]} rows but `eot` is {h}x{w} = {h * w} pixels; both must describe the "
            "same latent grid"
        )
    if not attn.is_floating_point() or not eot.is_floating_point():
        raise ValueError(f"`attn` and `eot` must be floating point, got {attn.dtype} and {eot.dtype}")
    if not bool(torch.isfinite(eot).all()):
        raise ValueError("`eot` contains NaN or inf")
    row_sums, minimum = _row_sums_and_min(attn.detach())  # (h·w,), float
    bad = torch.nonzero(~torch.isfinite(row_sums)).reshape(-1)  # NaN/inf in a row make its sum non-finite
    if len(bad):
        raise ValueError(f"`attn` contains NaN or inf (row {int(bad[0])})")
    if minimum < 0:
        raise ValueError(f"`attn` must be non-negative, got a minimum of {minimum:.3g}")
    off = torch.nonzero((row_sums - 1).abs() > _ROW_SUM_TOL).reshape(-1)
    if len(off):
        i = int(off[0])
        raise ValueError(
            f"`attn` rows must sum to 1 (distributions over the h*w keys); row {i} sums to {float(row_sums[i]):.6g}. "
            "Normalize first: attn / attn.sum(-1, keepdim=True)"
        )
    return h, w
