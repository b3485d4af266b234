"""FINCH (paper Eq. 2) over a distance callable: equivalence with `finch-clust`, constraints, stopping rules."""

from __future__ import annotations

import importlib.metadata
import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.datasets import load_digits, load_iris, load_wine, make_blobs
from sklearn.metrics import adjusted_rand_score

from conceptexpress.localize import FinchLevel, finch, pairwise_symmetric_kl

with warnings.catch_warnings():
    # finch-clust warns at import that pynndescent is missing; its exact 1-NN path is the one compared.
    warnings.simplefilter("ignore")
    import finch as finch_clust
    import finch.finch as finch_clust_module


def _cosine(x: torch.Tensor) -> torch.Tensor:
    xn = x / x.norm(dim=1, keepdim=True)
    return 1 - xn @ xn.T  # (k, k)


def _euclidean(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, x)  # (k, k)


DATASETS = {
    "iris": lambda: load_iris().data,
    "wine": lambda: load_wine().data,
    "digits": lambda: load_digits().data[:600],
    **{
        f"blobs{s}": (lambda s=s: make_blobs(500, centers=8, n_features=5, random_state=s)[0])
        for s in range(4)
    },
}


def _assert_same_hierarchy(ours: list[FinchLevel], c: np.ndarray, num_clust: list[int]) -> None:
    assert [level.num_clusters for level in ours] == list(num_clust)
    for i, level in enumerate(ours):
        assert adjusted_rand_score(c[:, i], level.labels.numpy()) == 1.0
        assert len(np.unique(level.labels.numpy())) == level.num_clusters


@pytest.mark.parametrize("name", list(DATASETS))
def test_plain_levels_match_finch_clust(name):
    data = DATASETS[name]()
    c, num_clust, _ = finch_clust.FINCH(data, distance="cosine", ensure_early_exit=False)
    ours = finch(torch.from_numpy(data.astype(np.float64)), _cosine, stop="finch-clust")
    _assert_same_hierarchy(ours, c, num_clust)


def _naive_symmetric_kl(p: np.ndarray, q: np.ndarray) -> float:
    p, q = np.maximum(p, 1e-12), np.maximum(q, 1e-12)
    return 0.5 * float(np.sum((p - q) * (np.log(p) - np.log(q))))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kl_levels_match_finch_clust_with_a_callable_metric(seed):
    """The pre-clustering setting: symmetric KL (Eq. 3) between distributions, ours vs finch-clust per pair."""
    rng = np.random.default_rng(seed)
    centers = rng.dirichlet(np.full(30, 0.3), size=6)  # (6, 30)
    rows = np.stack([rng.dirichlet(c * 50 + 0.01) for c in centers for _ in range(15)])  # (90, 30)
    c, num_clust, _ = finch_clust.FINCH(rows, distance=_naive_symmetric_kl, ensure_early_exit=False)
    ours = finch(torch.from_numpy(rows), pairwise_symmetric_kl, stop="finch-clust")
    _assert_same_hierarchy(ours, c, num_clust)


def _get_clust_dropping_links(a, orig_dist, min_sim=None):
    """finch-clust 0.2.3's get_clust with its link removal made effective.

    Its ``a[...] = 0`` on a CSR matrix stores explicit zeros, which scipy's connected_components still counts as
    edges, so ``ensure_early_exit=True`` never removes a link there (it equals ``ensure_early_exit=False``).
    Eliminating the zeros gives the behaviour its code intends, which is what ``max_link_distance`` implements.
    """
    if min_sim is not None:
        a[np.where((orig_dist * a.toarray()) > min_sim)] = 0
        a = sp.csr_matrix(a)
        a.eliminate_zeros()
    num_clust, u = sp.csgraph.connected_components(
        csgraph=a, directed=True, connection="weak", return_labels=True
    )
    return u, num_clust


def test_max_link_distance_matches_finch_clust_early_exit(monkeypatch):
    monkeypatch.setattr(finch_clust_module, "get_clust", _get_clust_dropping_links)
    constrained_somewhere = False
    for name, load in DATASETS.items():
        data = load()
        x = torch.from_numpy(data.astype(np.float64))
        c, num_clust, _ = finch_clust.FINCH(data, distance="cosine", ensure_early_exit=True)
        # finch-clust's min_sim = the largest link distance of the first round.
        min_sim = finch(x, _cosine, stop="finch-clust", graph="links")[0].max_link_distance
        ours = finch(x, _cosine, stop="finch-clust", max_link_distance=min_sim, graph="links")
        _assert_same_hierarchy(ours, c, num_clust)
        plain = finch(x, _cosine, stop="finch-clust")
        constrained_somewhere |= [lv.num_clusters for lv in plain] != [lv.num_clusters for lv in ours]
        assert all(level.max_link_distance <= min_sim for level in ours), name
    assert constrained_somewhere  # the threshold did change some hierarchy, so the comparison means something


@pytest.mark.skipif(
    importlib.metadata.version("finch-clust") != "0.2.3", reason="documents a finch-clust 0.2.3 behaviour"
)
def test_finch_clust_0_2_3_early_exit_removes_no_link():
    """Why the test above patches finch-clust: unpatched, ensure_early_exit=True gives the plain hierarchy."""
    data = DATASETS["wine"]()
    with_exit = finch_clust.FINCH(data, distance="cosine", ensure_early_exit=True)[1]
    without = finch_clust.FINCH(data, distance="cosine", ensure_early_exit=False)[1]
    assert with_exit == without


def _staircase_filter(src, dst, labels):
    """Only links touching the cluster of sample 0: at most one merge per round."""
    home = labels[0]
    return (src == home) | (dst == home)


# 1-D points, each farther from the growing cluster of 0: the counts go 5 -> 4 -> 3 -> 2 -> (1).
STAIRS = torch.tensor([[0.0], [1.0], [3.0], [7.0], [15.0]], dtype=torch.float64)


@pytest.mark.parametrize(
    ("stop", "counts"),
    [("design", [4, 3, 2]), ("original", [4, 3]), ("finch-clust", [4])],
)
def test_stop_rules_on_reductions_by_one(stop, counts):
    levels = finch(STAIRS, _euclidean, link_filter=_staircase_filter, stop=stop, graph="links")
    assert [level.num_clusters for level in levels] == counts
    expected = {4: [0, 0, 1, 2, 3], 3: [0, 0, 0, 1, 2], 2: [0, 0, 0, 0, 1]}
    assert [level.labels.tolist() for level in levels] == [expected[c] for c in counts]


def test_stop_rule_never_keeps_the_collapse_to_one():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]], dtype=torch.float64)
    levels = finch(x, _euclidean)
    assert [level.num_clusters for level in levels] == [2]  # the next round would join everything: not kept
    assert levels[0].labels.tolist() == [0, 0, 1, 1]
    assert levels[0].max_link_distance == 1.0


def test_first_round_is_always_kept():
    x = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    (level,) = finch(x, _euclidean)
    assert level.num_clusters == 1 and level.labels.tolist() == [0, 0]
    (level,) = finch(x, _euclidean, max_link_distance=0.5)  # every link removed: the identity partition
    assert level.num_clusters == 2 and level.labels.tolist() == [0, 1] and level.max_link_distance == 0.0
    (level,) = finch(x[:1], _euclidean)
    assert level.num_clusters == 1 and level.labels.tolist() == [0]


def test_link_filter_and_threshold_remove_links():
    x = torch.tensor([[0.0], [1.0], [3.0], [10.0], [11.5]], dtype=torch.float64)
    assert finch(x, _euclidean)[0].labels.tolist() == [0, 0, 0, 1, 1]
    assert finch(x, _euclidean, max_link_distance=1.5)[0].labels.tolist() == [0, 0, 1, 2, 2]
    forbid_3_4 = lambda s, d, lab: ~(((s == 3) & (d == 4)) | ((s == 4) & (d == 3)))  # noqa: E731
    assert finch(x, _euclidean, link_filter=forbid_3_4)[0].labels.tolist() == [0, 0, 0, 1, 2]


def test_weighted_means_are_means_of_underlying_rows():
    rng = np.random.default_rng(0)
    rows = torch.from_numpy(rng.random((30, 4)))  # (30, 4) "pixels"
    groups = torch.from_numpy(np.repeat(np.arange(6), [2, 3, 4, 5, 7, 9]))  # 6 groups of unequal size
    sizes = torch.bincount(groups).double()
    centroids = torch.zeros(6, 4, dtype=torch.float64).index_add_(0, groups, rows) / sizes[:, None]
    for level in finch(centroids, _euclidean, weights=sizes, stop="design"):
        pixel_labels = level.labels[groups]  # (30,)
        for c in range(level.num_clusters):
            torch.testing.assert_close(level.means[c], rows[pixel_labels == c].mean(0))


def test_labels_numbered_by_first_member_and_deterministic():
    data = torch.from_numpy(make_blobs(300, centers=6, n_features=3, random_state=7)[0])
    a, b = finch(data, _euclidean), finch(data, _euclidean)
    for la, lb in zip(a, b, strict=True):
        assert torch.equal(la.labels, lb.labels) and la.labels.dtype == torch.int64
        first_seen = list(dict.fromkeys(la.labels.tolist()))
        assert first_seen == list(range(la.num_clusters))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="2-D"):
        finch(torch.ones(4), _euclidean)
    with pytest.raises(ValueError, match="at least one row"):
        finch(torch.ones(0, 3), _euclidean)
    with pytest.raises(ValueError, match="stop"):
        finch(torch.ones(3, 2), _euclidean, stop="never")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weights"):
        finch(torch.ones(3, 2), _euclidean, weights=torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="distance"):
        finch(torch.ones(3, 2), lambda x: torch.zeros(2, 2))


def test_eq2_graph_joins_shared_neighbours_under_constraints():
    """Eq. 2 also joins i and j when κ_i = κ_j, and a constraint is checked on each such pair (released code).

    κ_0 = κ_2 = 1. A predicate forbids 0—1 (think: masks that do not touch) but allows 0—2: through the
    shared-neighbour pair Eq. 2 still joins 0 with 2 (and 1); first-neighbour links alone leave 0 apart.
    The δ threshold alone cannot make this difference: d(i, j) ≥ d(i, κ_i) for a shared neighbour.
    """
    pts = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 0.9]], dtype=torch.float64)

    def forbid_0_1(src, dst, labels):
        return ~(((src == 0) & (dst == 1)) | ((src == 1) & (dst == 0)))

    eq2 = finch(pts, _euclidean, link_filter=forbid_0_1)[0]
    links = finch(pts, _euclidean, link_filter=forbid_0_1, graph="links")[0]
    assert eq2.labels.tolist() == [0, 0, 0]
    assert links.labels.tolist() == [0, 1, 1]
    # δ of Eq. 2 is the largest distance over every kept pair, shared-neighbour pairs included.
    assert eq2.max_link_distance == pytest.approx(float(torch.dist(pts[0], pts[2])))
    assert links.max_link_distance == pytest.approx(0.9)


@pytest.mark.parametrize("n", [1, 2, 7, 60])
def test_shared_neighbour_pairs_brute_force(n):
    from conceptexpress.localize.finch import _shared_neighbour_pairs

    kappa = np.random.default_rng(n).integers(0, max(1, n // 3), n)
    src, dst = _shared_neighbour_pairs(kappa)
    assert (src < dst).all()
    expected = {(i, j) for i in range(n) for j in range(i + 1, n) if kappa[i] == kappa[j]}
    assert set(zip(src.tolist(), dst.tolist())) == expected and len(src) == len(expected)
