"""k-means@k and FINCH@k baselines of the localization benchmark (§4.5) on synthetic attention from a label image."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conceptexpress.baselines.clustering import (
    finch_fixed_concepts,
    finch_fixed_labels,
    finch_levels,
    kmeans_concepts,
)
from conceptexpress.localize import cluster_concepts, eot_filter, finch, pairwise_symmetric_kl
from conceptexpress.locbench.matching import match_masks


def label_image(size: int = 16) -> torch.Tensor:
    """(size, size) int64: background 0 and three rectangular objects 1..3."""
    lab = torch.zeros(size, size, dtype=torch.long)
    s = size / 16
    lab[round(2 * s) : round(7 * s), round(2 * s) : round(7 * s)] = 1
    lab[round(9 * s) : round(14 * s), round(3 * s) : round(9 * s)] = 2
    lab[round(3 * s) : round(9 * s), round(10 * s) : round(14 * s)] = 3
    return lab


def synthetic_attention(
    lab: torch.Tensor, *, region=0.8, local=0.1, noise=0.1, sigma=1.5, seed=0
) -> torch.Tensor:
    """(h·w, h·w) row-stochastic: each row = its region's indicator (uniform over the region) + a Gaussian
    around the pixel + random noise, normalized."""
    h, w = lab.shape
    flat = lab.reshape(-1)
    onehot = F.one_hot(flat).double()  # (n, K)
    rows = onehot @ (onehot / onehot.sum(0)).T  # (n, n), uniform over the pixel's region
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    pos = torch.stack([ys.reshape(-1), xs.reshape(-1)], 1).double()
    g = torch.exp(-torch.cdist(pos, pos).square() / (2 * sigma**2))
    r = torch.rand(len(flat), len(flat), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a = region * rows + local * g / g.sum(1, keepdim=True) + noise * r / r.sum(1, keepdim=True)
    return (a / a.sum(1, keepdim=True)).float()


@pytest.fixture(scope="module")
def scene():
    lab = label_image()
    attn = synthetic_attention(lab)
    eot = (lab > 0).float() + 0.05 * torch.rand(
        16, 16, generator=torch.Generator().manual_seed(1)
    )  # high on objects
    gt = (lab[None] == torch.arange(1, 4)[:, None, None]).numpy()
    return attn, eot, gt


@pytest.mark.parametrize("method", ["kmeans", "finch"])
@pytest.mark.parametrize("k", [2, 3, 4, 5, 7])
def test_exactly_k_clusters_before_filter_and_at_most_k_masks_after(scene, method, k):
    attn, eot, _ = scene
    r = (
        kmeans_concepts(attn, eot, k, seed=0, n_init=3)
        if method == "kmeans"
        else finch_fixed_concepts(attn, eot, k)
    )
    assert r.num_clusters == k
    assert sorted(np.unique(r.labels).tolist()) == list(range(k))
    assert r.kept.shape == (k,) and r.masks.shape == (int(r.kept.sum()), 16, 16)
    assert len(r.masks) <= k
    assert r.masks.sum(0).max() <= 1  # disjoint
    for mask, cluster in zip(r.masks, np.nonzero(r.kept)[0]):
        assert (mask == (r.labels == cluster)).all()


def test_baselines_recover_the_objects_at_the_right_count(scene):
    attn, eot, gt = scene
    km = kmeans_concepts(attn, eot, 4, seed=0)  # background + 3 objects
    assert len(km.masks) == 3 and match_masks(km.masks, gt).iou == 1.0
    assert match_masks(finch_fixed_concepts(attn, eot, 7).masks, gt).iou == 1.0


def test_deterministic(scene):
    attn, eot, _ = scene
    a, b = kmeans_concepts(attn, eot, 5, seed=3, n_init=2), kmeans_concepts(attn, eot, 5, seed=3, n_init=2)
    assert (a.labels == b.labels).all() and (a.masks == b.masks).all()
    f1, f2 = finch_fixed_concepts(attn, eot, 5), finch_fixed_concepts(attn, eot, 5)
    assert (f1.labels == f2.labels).all()


def test_shared_hierarchy_gives_the_same_result_and_is_not_modified(scene):
    attn, eot, _ = scene
    levels = finch_levels(attn)
    means = [lv.means.clone() for lv in levels]
    for k in (2, 4, 9):
        assert (
            finch_fixed_concepts(attn, eot, k, levels=levels).labels
            == finch_fixed_concepts(attn, eot, k).labels
        ).all()
    assert all(torch.equal(m, lv.means) for m, lv in zip(means, levels))


def test_finch_reduction_matches_finch_clust_req_clust():
    pytest.importorskip("finch")
    from sklearn.metrics import adjusted_rand_score

    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore"
        )  # finch-clust warns that pynndescent is missing (not needed at this size)
        from finch import FINCH

    x = synthetic_attention(label_image(12), seed=2).double()

    def kl(a, b):  # Eq. 3 for sklearn's pairwise_distances
        a, b = np.maximum(a, 1e-12), np.maximum(b, 1e-12)
        return 0.5 * float(((a - b) * (np.log(a) - np.log(b))).sum())

    levels = finch(x, pairwise_symmetric_kl, stop="finch-clust")
    for k in (2, 4, 8, 15):
        _, _, req = FINCH(x.numpy(), req_clust=k, distance=kl, ensure_early_exit=False)
        ours, _ = finch_fixed_labels(x, k, levels)
        assert len(np.unique(ours)) == k
        assert adjusted_rand_score(req, ours) == 1.0


def test_fewer_levels_than_k_uses_the_finest_level_with_a_message(scene):
    attn, eot, _ = scene
    finest = finch_levels(attn)[0].num_clusters
    r = finch_fixed_concepts(attn, eot, finest + 1)
    assert r.num_clusters == finest and "finest level" in r.messages[0]


def test_eot_filter_is_the_cores_filter(scene):
    attn, eot, _ = scene
    ours = cluster_concepts(attn, eot, n_max=10)
    filtered = eot_filter(ours.pre_labels.numpy(), eot)  # the one public function both use
    assert (filtered.kept == ours.kept).all()
    assert np.allclose(filtered.scores.numpy(), ours.scores.numpy(), atol=1e-6)
    assert filtered.threshold == pytest.approx(ours.threshold)


def test_constant_eot_keeps_nothing(scene):
    attn, _, _ = scene
    r = kmeans_concepts(attn, torch.ones(16, 16), 4, n_init=1)
    assert r.num_clusters == 4 and len(r.masks) == 0


def test_errors(scene):
    attn, eot, _ = scene
    with pytest.raises(ValueError, match="`k`"):
        kmeans_concepts(attn, eot, 0)
    with pytest.raises(ValueError, match="`attn`"):
        finch_fixed_concepts(attn[:10], eot, 3)
