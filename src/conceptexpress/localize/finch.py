"""FINCH hierarchical clustering (Sarfraz et al., CVPR 2019; paper Eq. 2) over any distance, with link constraints.

One round: every current cluster i is linked to its first neighbour κ_i (the nearest other cluster under the
given distance, ties to the lowest index); the clusters of the next level are the connected components of the
graph of Eq. 2 (G(i, j) = 1 if κ_i = j, κ_j = i or κ_i = κ_j; its components are those of the links i—κ_i).
The first round runs on the samples, every later one on the means of the *original* samples of each cluster
(as ``finch-clust``'s ``get_merge``), until a round would not give a usable level.

ConceptExpress (§3.2) adds constraints to the post-clustering: a link i—κ_i is dropped when its distance exceeds
a threshold δ, or when a predicate rejects it (the two masks do not touch). Both are parameters here, so the
same function serves the plain pre-clustering, the constrained post-clustering and the equivalence tests
against ``finch-clust``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from torch import Tensor

__all__ = ["FinchLevel", "GraphRule", "LinkFilter", "StopRule", "finch", "single_torch_thread"]

LinkFilter = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``keep = link_filter(src, dst, labels)``: ``src``, ``dst`` (e,) int64 cluster indices of the candidate links
src—dst of one round (dst = κ_src); ``labels`` (n,) int64 maps each original sample to its current cluster.
Returns an (e,) bool tensor, True for links to keep."""

StopRule = Literal["design", "original", "finch-clust"]
GraphRule = Literal["eq2", "links"]


@dataclass(frozen=True)
class FinchLevel:
    """One partition of the FINCH hierarchy.

    Attributes:
        labels: (n,) int64 cluster index in ``0..num_clusters-1`` of every original sample. Clusters are numbered
            by their smallest member index, so equal inputs give equal labels.
        num_clusters: number of clusters k.
        max_link_distance: largest distance among the pairs kept in the round that produced this level (the
            package's δ of the paper's pre-clustering, ``clustering="paper"``); 0.0 when that round kept no pair.
        means: (k, d) weighted mean of the original samples of each cluster (float32 or float64, like the input).
        max_adjacency_distance: largest d_ij · adj_ij over the pairs kept in that round, where adj = (A + I)(A + I)ᵀ
            with a zero diagonal and A the first-neighbour matrix of Eq. 2 (A_ij = 1 iff j = κ_i): adj_ij =
            [κ_i = j] + [κ_j = i] + [κ_i = κ_j], so a mutual first-neighbour pair counts twice and this is
            max(largest non-mutual distance, 2 × largest mutual distance). It is δ as the released code computes
            it (``np.max(orig_dist * adj)``, ``clustering="released"``); 0.0 when the round kept no pair.
    """

    labels: Tensor
    num_clusters: int
    max_link_distance: float
    means: Tensor
    max_adjacency_distance: float = 0.0


def finch(
    x: Tensor,
    distance: Callable[[Tensor], Tensor],
    *,
    weights: Tensor | None = None,
    max_link_distance: float | None = None,
    link_filter: LinkFilter | None = None,
    stop: StopRule = "design",
    graph: GraphRule = "eq2",
) -> list[FinchLevel]:
    """Run FINCH on the rows of ``x`` and return its levels, finest first.

    Args:
        x: (n, d) float samples, n >= 1.
        distance: maps (k, d) rows to a (k, k) matrix of distances (only the off-diagonal entries are read; the
            returned matrix may be overwritten in place). E.g. ``pairwise_symmetric_kl`` (Eq. 3) or a cosine
            distance.
        weights: optional (n,) positive mass of each sample. Cluster means are weighted by it, so that clustering
            cluster centroids with weights = cluster sizes gives the means over the underlying rows.
        max_link_distance: drop a link whose distance exceeds this value (δ of §3.2), in every round including
            the first. ``None`` or ``inf``: no threshold.
        link_filter: drop the links this predicate rejects (see ``LinkFilter``), in every round.
        stop: when the hierarchy ends. A round that collapses everything into one cluster, or does not reduce
            the count, always ends it and is not kept (as in standard FINCH). Then:

            - ``"design"`` (default, docs/fidelity.md): any round that reduces the count is kept and the next one runs.
            - ``"original"``: as in Sarfraz's reference code and the ConceptExpress release: a round that reduces
              the count by exactly one is kept and ends the hierarchy.
            - ``"finch-clust"``: as ``finch-clust`` 0.2.3 (``exit_clust <= 1``): a round that reduces the count
              by exactly one is dropped and ends the hierarchy.

            The first round is always kept (it may leave everything apart when constraints remove all links, or
            join everything): FINCH always returns at least one level.
        graph: which pairs are edges of a round's graph.

            - ``"eq2"`` (default): the graph of paper Eq. 2, G(i, j) = 1 if κ_i = j, κ_j = i or κ_i = κ_j — the
              first-neighbour links *and* the pairs that share a first neighbour, as the released code builds it
              (``(A + I)(A + I)ᵀ``). The constraints (δ, the link predicate) are checked on every such pair with
              that pair's own distance. A level reports both δs over the kept pairs: the largest distance
              (``max_link_distance``) and the released code's largest d_ij · adj_ij (``max_adjacency_distance``).
            - ``"links"``: only the links i—κ_i (``finch-clust``). Without constraints both give the same
              partitions (shared-neighbour pairs are already joined through the neighbour); they differ in the
              constrained post-clustering and in δ.

    Returns:
        The levels, with strictly decreasing ``num_clusters`` after the first.

    Notes:
        ``finch(x, cosine, stop="finch-clust")`` reproduces ``finch.FINCH(x, distance="cosine",
        ensure_early_exit=False)``. Adding ``max_link_distance`` = the largest link distance of the first round
        gives what ``ensure_early_exit=True`` (its ``min_sim``) intends; in finch-clust 0.2.3 that option has no
        effect, because the links it zeroes stay in the CSR graph as explicit zeros, which scipy's
        ``connected_components`` still follows (tests/localize/test_finch.py checks against a corrected copy).
    """
    if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
        raise ValueError(f"`x` must be a 2-D floating-point tensor (n, d), got {_describe(x)}")
    n = x.shape[0]
    if n == 0:
        raise ValueError("`x` must have at least one row, got shape (0, d)")
    if stop not in ("design", "original", "finch-clust"):
        raise ValueError(f"`stop` must be 'design', 'original' or 'finch-clust', got {stop!r}")
    if graph not in ("eq2", "links"):
        raise ValueError(f"`graph` must be 'eq2' or 'links', got {graph!r}")
    if weights is not None:
        weights = weights.to(device=x.device, dtype=x.dtype).reshape(-1)
        if weights.shape[0] != n or bool((weights <= 0).any()):
            raise ValueError(f"`weights` must be ({n},) and positive, got shape {tuple(weights.shape)}")
    threshold = None if max_link_distance is None or max_link_distance == float("inf") else max_link_distance

    # Round 0 works on the samples themselves: labels = identity, "means" = rows, masses = weights.
    labels = torch.arange(n, device=x.device)  # (n,) sample -> current cluster
    points = x  # (k, d), the rows the next round measures distances between
    sums = x if weights is None else x * weights[:, None]  # (k, d) weighted sums of original rows
    mass = torch.ones(n, dtype=x.dtype, device=x.device) if weights is None else weights  # (k,)

    levels: list[FinchLevel] = []
    while True:
        k = points.shape[0]
        dist = distance(points) if k > 1 else None  # (k, k), with the caller's thread settings
        # Bookkeeping below is many small ops: one torch thread (see single_torch_thread).
        with single_torch_thread(x.device):
            comp, num, delta, adj_delta = _merge_first_neighbours(
                dist, k, labels, threshold, link_filter, graph
            )
            if levels:  # the first round is always kept
                reduction = k - num
                if num == 1 or reduction < 1 or (stop == "finch-clust" and reduction == 1):
                    break
            labels = comp[labels]  # (n,) sample -> new cluster
            sums = _sum_by(comp, sums, num)  # (num, d) weighted sums of the original rows
            mass = _sum_by(comp, mass, num)  # (num,)
            points = sums / mass[:, None]  # (num, d) weighted means of the original rows
        levels.append(
            FinchLevel(
                labels=labels,
                num_clusters=num,
                max_link_distance=delta,
                means=points,
                max_adjacency_distance=adj_delta,
            )
        )
        if num == 1 or (stop == "original" and len(levels) > 1 and k - num == 1):
            break
    return levels


def _merge_first_neighbours(
    dist: Tensor | None,
    k: int,
    labels: Tensor,
    threshold: float | None,
    link_filter: LinkFilter | None,
    graph: GraphRule = "eq2",
) -> tuple[Tensor, int, float, float]:
    """One FINCH round on the (k, k) distances between current clusters (None when k = 1): build the graph
    (first-neighbour links, plus shared-neighbour pairs for ``graph="eq2"``), drop the pairs the constraints
    reject, merge the connected components.

    Returns (comp (k,) int64 new cluster of each current cluster, numbered by smallest member; the number of
    clusters; the largest distance over the kept pairs; the largest d_ij · adj_ij over them, see ``FinchLevel``).
    """
    if dist is None:
        return torch.zeros(1, dtype=torch.long, device=labels.device), 1, 0.0, 0.0
    if tuple(dist.shape) != (k, k):
        raise ValueError(
            f"`distance` must return a ({k}, {k}) matrix for {k} rows, got shape {tuple(dist.shape)}"
        )
    dist.fill_diagonal_(float("inf"))  # a point is not its own first neighbour
    src = torch.arange(k, device=dist.device)  # (k,)
    dst = _row_argmin(dist)  # (k,) κ_i, first index on ties
    # adj_ij of (A + I)(A + I)ᵀ: 2 for both entries i—κ_i, κ_i—i of a mutual pair, 1 for every other pair of G.
    multiplicity = 1 + (dst[dst] == src).to(dist.dtype)  # (k,) of the links; shared-neighbour pairs: 1
    if graph == "eq2":
        sib_src, sib_dst = _shared_neighbour_pairs(dst.cpu().numpy())
        src = torch.cat([src, torch.from_numpy(sib_src).to(dist.device)])  # (e,)
        dst = torch.cat([dst, torch.from_numpy(sib_dst).to(dist.device)])
        multiplicity = torch.cat([multiplicity, multiplicity.new_ones(len(sib_src))])  # (e,)
    link = dist[src, dst]  # (e,) each pair's own distance
    keep = torch.ones(link.shape[0], dtype=torch.bool, device=dist.device)
    if threshold is not None:
        keep &= link <= threshold
    if link_filter is not None:
        keep &= link_filter(src, dst, labels).to(device=dist.device, dtype=torch.bool).reshape(-1)
    any_kept = bool(keep.any())
    delta = float(link[keep].max()) if any_kept else 0.0
    adj_delta = float((link * multiplicity)[keep].max()) if any_kept else 0.0

    s, t = src[keep].cpu().numpy(), dst[keep].cpu().numpy()
    graph_matrix = sp.coo_matrix((np.ones(len(s), dtype=np.int8), (s, t)), shape=(k, k)).tocsr()
    num, comp = connected_components(graph_matrix, directed=True, connection="weak")
    comp = _number_by_first_member(comp)
    return torch.from_numpy(comp).to(labels.device), int(num), delta, adj_delta


def _shared_neighbour_pairs(kappa: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All pairs i < j with κ_i = κ_j (the third case of Eq. 2), as two int64 arrays (vectorized: no loop)."""
    n = len(kappa)
    order = np.lexsort((np.arange(n), kappa))  # by κ, then by index
    sorted_k = kappa[order]
    starts = np.flatnonzero(np.r_[True, sorted_k[1:] != sorted_k[:-1]])
    ends = np.r_[starts[1:], n]
    group_end = np.repeat(ends, ends - starts)  # (n,) end of each sorted position's group
    later = group_end - np.arange(n) - 1  # members after this position in its group
    total = int(later.sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    first = np.repeat(np.arange(n), later)  # (P,) sorted position of the first member of each pair
    offset = np.arange(total) - np.repeat(np.cumsum(later) - later, later)  # 0.. within each first's run
    second = first + 1 + offset
    return order[first].astype(np.int64), order[second].astype(np.int64)


@contextmanager
def single_torch_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU ops on one thread inside the block, restoring the previous count after.

    Measured on a 2-core CPU: ``index_add_`` of 4096 rows of 4096 takes 250 ms on two threads and 14 ms on one,
    and right after an OpenBLAS product (whose workers keep spinning for a while) every multi-threaded torch op
    waits for a core. The ops run here are memory-bound, so one thread loses nothing.
    """
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _sum_by(index: Tensor, values: Tensor, num: int) -> Tensor:
    """(num, ...) sums of the rows of ``values`` grouped by ``index`` (k,) in 0..num-1."""
    return values.new_zeros((num, *values.shape[1:])).index_add_(0, index, values)


def _row_argmin(dist: Tensor) -> Tensor:
    """Index of each row's minimum, the first one on ties (numpy's is ~15x faster than torch's on CPU, k = 4096)."""
    if dist.device.type == "cpu":
        return torch.from_numpy(dist.numpy().argmin(axis=1))
    return dist.argmin(dim=1)


def _number_by_first_member(labels: np.ndarray) -> np.ndarray:
    """Relabel so that cluster c is the one whose smallest member comes c-th (scipy's order is not documented)."""
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(len(first), dtype=np.int64)
    rank[np.argsort(first)] = np.arange(len(first))
    return rank[inverse.reshape(-1)]


def _describe(x: object) -> str:
    if isinstance(x, Tensor):
        return f"shape {tuple(x.shape)} dtype {x.dtype}"
    return type(x).__name__
