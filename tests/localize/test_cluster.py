"""Concept localization (paper §3.2) on synthetic self-attention built from label images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conceptexpress.localize import ConceptClusters, cluster_concepts


def synthetic_attention(
    labels: torch.Tensor,
    affinity: list[list[float]] | None = None,
    *,
    region: float = 0.6,
    local: float = 0.3,
    noise: float = 0.1,
    sigma: float = 2.0,
    radius: float | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Row-stochastic (h*w, h*w) attention from an (h, w) label image (0 = background, 1..k = objects).

    Row p = region * (Σ_r affinity[L(p), r] · uniform over region r, normalized) + local * Gaussian around p
    (cut at ``radius``) + noise * random, normalized: pixels attend to their own region (or to the regions their
    label is made similar to by ``affinity``), a little to their neighbourhood, and a little at random.
    """
    h, w = labels.shape
    lab = labels.reshape(-1)
    n, k = lab.numel(), int(lab.max()) + 1
    aff = (
        torch.eye(k, dtype=torch.float64) if affinity is None else torch.tensor(affinity, dtype=torch.float64)
    )
    onehot = F.one_hot(lab, k).double()  # (n, k)
    rows = aff[lab] @ (onehot / onehot.sum(0)).T  # (n, n)
    rows = region * rows / rows.sum(1, keepdim=True)
    if local:
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).double()  # (n, 2)
        d2 = torch.cdist(pos, pos).square()  # (n, n)
        g = torch.exp(-d2 / (2 * sigma**2))
        if radius is not None:
            g[d2 > radius**2] = 0.0
        rows += local * g / g.sum(1, keepdim=True)
    if noise:
        r = torch.rand(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        rows += noise * r / r.sum(1, keepdim=True)
    return (rows / rows.sum(1, keepdim=True)).to(dtype)


def rectangles(k: int, size: int = 32) -> torch.Tensor:
    lab = torch.zeros(size, size, dtype=torch.long)
    for i, (y0, y1, x0, x1) in enumerate(
        [(3, 13, 3, 13), (18, 29, 4, 15), (4, 14, 18, 29), (19, 28, 19, 28)][:k]
    ):
        lab[y0:y1, x0:x1] = i + 1
    return lab


def discs(k: int, size: int = 32) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    lab = torch.zeros(size, size, dtype=torch.long)
    for i, (cy, cx, r) in enumerate([(8, 8, 5), (23, 9, 6), (9, 23, 5.5), (23, 23, 4.5)][:k]):
        lab[(ys - cy) ** 2 + (xs - cx) ** 2 <= r * r] = i + 1
    return lab


def eot_for(labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Raw [EOT] map: high on objects, low on background, with noise; deliberately not in [0, 1]."""
    noise = torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed))
    return 0.2 + 0.8 * (labels > 0).float() + 0.05 * noise


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a & b).sum() / (a | b).sum())


def assert_recovers(result: ConceptClusters, labels: torch.Tensor, min_iou: float = 0.9) -> None:
    k = int(labels.max())
    assert result.num_concepts == k, (result.levels, result.pre_level, result.messages)
    for obj in range(1, k + 1):
        assert max(iou(m, labels == obj) for m in result.masks) >= min_iou


def assert_consistent(result: ConceptClusters) -> None:
    n, h, w = result.masks.shape
    assert result.masks.dtype == torch.bool and result.centroids.shape == (n, h * w)
    assert result.centroids.dtype == torch.float32 and torch.isfinite(result.centroids).all()
    assert n == 0 or int(result.masks.sum(0).max()) <= 1  # disjoint
    for i in range(n):
        assert torch.equal(result.masks[i], result.post_labels == i)
    firsts = [int(torch.nonzero(m.reshape(-1))[0]) for m in result.masks]
    assert firsts == sorted(firsts)  # raster order of first pixels
    assert result.kept.shape == (result.levels[result.pre_level],) == result.scores.shape
    assert bool(((result.post_labels >= 0) == result.kept[result.pre_labels]).all())


@pytest.mark.parametrize("shape", [rectangles, discs])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_objects(shape, k, seed):
    labels = shape(k)
    result = cluster_concepts(
        synthetic_attention(labels, seed=seed, dtype=torch.float32), eot_for(labels, seed)
    )
    assert_recovers(result, labels)
    assert_consistent(result)
    assert result.messages == ()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_clustered_in_float32(dtype):
    labels = rectangles(3)
    attn = synthetic_attention(labels, seed=2, dtype=torch.float32).to(dtype)
    result = cluster_concepts(attn, eot_for(labels, 2).to(dtype))
    assert_recovers(result, labels)
    assert_consistent(result)


def test_paper_centroids_are_eq6():
    labels = rectangles(3)
    attn = synthetic_attention(labels, seed=3)  # float64
    result = cluster_concepts(attn, eot_for(labels), clustering="paper")
    m = result.masks.reshape(result.num_concepts, -1).double()  # (N, h*w)
    expected = m @ attn / m.sum(1, keepdim=True)  # f_i = m_i · A / |m_i|
    torch.testing.assert_close(result.centroids, expected.float(), rtol=1e-5, atol=1e-7)


def test_deterministic():
    labels = discs(4)
    attn, eot = synthetic_attention(labels, seed=5, dtype=torch.float32), eot_for(labels, 5)
    a, b = cluster_concepts(attn, eot), cluster_concepts(attn.clone(), eot.clone())
    assert torch.equal(a.masks, b.masks) and torch.equal(a.centroids, b.centroids)
    assert torch.equal(a.pre_labels, b.pre_labels) and a.delta == b.delta and a.levels == b.levels


def test_zeros_in_attention_give_no_nan():
    labels = rectangles(3)
    # Region term is zero outside the own region, the local term is cut at radius 3, no noise: mostly zeros.
    attn = synthetic_attention(labels, local=0.4, radius=3.0, noise=0.0, dtype=torch.float32)
    assert float((attn == 0).float().mean()) > 0.5
    result = cluster_concepts(attn, eot_for(labels))
    assert_recovers(result, labels)
    assert_consistent(result)
    assert torch.isfinite(torch.tensor(result.delta))


# Two regions side by side, each attending only to itself (plus noise): the pre-clustering ends on
# {background, left, right}, and the two objects are far apart in KL but spatially adjacent.
def _adjacent_pair() -> torch.Tensor:
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[3:13, 2:8] = 1
    labels[3:13, 8:14] = 2
    return labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delta_keeps_adjacent_objects_apart(seed):
    labels = _adjacent_pair()
    attn = synthetic_attention(labels, local=0.0, noise=0.05, seed=seed)
    eot = (labels > 0).double()
    with_delta = cluster_concepts(attn, eot, n_max=3)
    without = cluster_concepts(attn, eot, n_max=3, delta_constraint=False)
    assert_recovers(with_delta, labels)
    assert without.num_concepts == 1  # nearest neighbours and touching: merged once δ is off
    assert torch.equal(without.masks[0], labels > 0)


# Two separate squares whose pixels attend to both squares (the same "semantics", slightly more to their own).
def _distant_lookalikes() -> tuple[torch.Tensor, list[list[float]]]:
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[2:7, 2:7] = 1
    labels[9:14, 9:14] = 2
    return labels, [[1.0, 0.0, 0.0], [0.1, 0.5, 0.4], [0.1, 0.4, 0.5]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adjacency_keeps_distant_lookalikes_apart(seed):
    labels, affinity = _distant_lookalikes()
    attn = synthetic_attention(labels, affinity, local=0.0, noise=0.05, seed=seed)
    eot = (labels > 0).double()
    # δ off in both runs, so that only the adjacency rule differs.
    with_adjacency = cluster_concepts(attn, eot, n_max=3, delta_constraint=False)
    without = cluster_concepts(attn, eot, n_max=3, delta_constraint=False, adjacency_constraint=False)
    assert_recovers(with_adjacency, labels)
    assert without.num_concepts == 1 and torch.equal(without.masks[0], labels > 0)
    assert_recovers(cluster_concepts(attn, eot, n_max=3), labels)  # and with both constraints on


# A (100 px) above B (56 px), background 100 px: with e = 1 on A, b on B, 0 elsewhere the image mean is
# (100 + 56 b) / 256, which is exactly 0.5 when b = 0.5.
def _filter_layout() -> torch.Tensor:
    labels = torch.zeros(16, 16, dtype=torch.long)
    labels[0:10, 0:10] = 1
    labels[10:14, 0:14] = 2
    assert [int((labels == i).sum()) for i in range(3)] == [100, 100, 56]
    return labels


def _filter_attention(labels: torch.Tensor) -> torch.Tensor:
    return synthetic_attention(labels, local=0.0, noise=0.05, seed=0)


def test_filter_is_strict():
    labels = _filter_layout()
    attn = _filter_attention(labels)
    values = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)
    result = cluster_concepts(attn, values[labels], n_max=3)
    assert result.threshold == 0.5
    b_clusters = result.pre_labels[labels == 2].unique()
    assert torch.all(result.scores[b_clusters] == 0.5) and not result.kept[b_clusters].any()  # equal: dropped
    assert result.num_concepts == 1 and torch.equal(result.masks[0], labels == 1)
    values[2] = 0.51  # just above the (new) image mean: kept
    assert cluster_concepts(attn, values[labels], n_max=3).num_concepts == 2


def test_filter_reads_the_min_max_normalized_map():
    labels = _filter_layout()
    attn = _filter_attention(labels)
    e = torch.tensor([0.0, 1.0, 0.3], dtype=torch.float64)[labels]
    reference = cluster_concepts(attn, e, n_max=3)
    assert reference.num_concepts == 1 and torch.equal(reference.masks[0], labels == 1)
    # Scale and shift do not change the normalized map, hence not the result ...
    for raw in (3 * e + 7, e - 0.6):
        result = cluster_concepts(attn, raw, n_max=3)
        assert torch.equal(result.kept, reference.kept) and torch.equal(result.masks, reference.masks)
        torch.testing.assert_close(result.eot, reference.eot.float())
    # ... while Eq. 5 read literally (l1 norms) on the raw signed map would keep the background instead of A.
    signed = (e - 0.6).reshape(-1).abs()
    pre = reference.pre_labels.reshape(-1)
    literal = torch.stack([signed[pre == c].mean() for c in range(len(reference.kept))]) > signed.mean()
    assert not torch.equal(literal, reference.kept)
    assert bool(literal[pre[labels.reshape(-1) == 0]].all()) and not bool(
        literal[pre[labels.reshape(-1) == 1]].any()
    )


def test_constant_eot_finds_nothing():
    labels = rectangles(2)
    attn = synthetic_attention(labels, dtype=torch.float32)
    result = cluster_concepts(attn, torch.full((32, 32), 0.37))
    assert result.num_concepts == 0
    assert result.masks.shape == (0, 32, 32) and result.centroids.shape == (0, 32 * 32)
    assert torch.all(result.post_labels == -1) and not result.kept.any()
    assert torch.all(result.eot == 0)
    assert any("constant" in m for m in result.messages) and any("no concept" in m for m in result.messages)


def test_no_level_with_n_max_clusters_uses_finest_level():
    labels = rectangles(2)
    attn = synthetic_attention(labels, dtype=torch.float32)
    result = cluster_concepts(attn, eot_for(labels), n_max=5000, clustering="paper")
    assert result.pre_level == 0 and result.levels[0] < 5000
    assert any("n_max=5000" in m for m in result.messages)
    assert result.delta > 0  # "paper": the first partition's δ comes from its own round
    assert_consistent(result)
    # "released": the released code defines no δ at the first partition (min_sim=None), and says so.
    released = cluster_concepts(attn, eot_for(labels), n_max=5000)
    assert released.pre_level == 0 and released.delta is None
    assert any("without the δ constraint" in m for m in released.messages)
    assert_consistent(released)


def test_rejects_bad_inputs():
    attn = synthetic_attention(rectangles(1, size=4), noise=0.1)
    eot = torch.rand(4, 4)
    with pytest.raises(ValueError, match="16 rows but `eot` is 3x5 = 15 pixels"):
        cluster_concepts(attn, torch.rand(3, 5))
    with pytest.raises(ValueError, match="square"):
        cluster_concepts(attn[:, :8], eot)
    with pytest.raises(ValueError, match=r"\(h, w\)"):
        cluster_concepts(attn, eot.reshape(-1))
    bad = attn.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN.*row 3"):
        cluster_concepts(bad, eot)
    with pytest.raises(ValueError, match="`eot` contains NaN"):
        cluster_concepts(attn, torch.full((4, 4), float("nan")))
    with pytest.raises(ValueError, match="n_max"):
        cluster_concepts(attn, eot, n_max=1)
    with pytest.raises(ValueError, match="sum to 1"):
        cluster_concepts(attn * 2, eot)
    negative = attn.clone()
    negative[0, 0] = -0.1
    negative[0, 1] += 0.1
    with pytest.raises(ValueError, match="non-negative"):
        cluster_concepts(negative, eot)


def test_import_does_not_load_diffusers_or_transformers(heavy_imports):
    assert heavy_imports["conceptexpress.localize"] == []
