"""Evaluation metrics (paper §4.2) on hand-made feature vectors with known answers."""

from __future__ import annotations

import pytest
import torch

from conceptexpress.evaluate.metrics import (
    compositional_similarity,
    cosine_similarity_matrix,
    identity_similarity,
    l2_normalize,
    topk_accuracy,
    topk_correct,
)

E = torch.eye(4)  # orthonormal basis e0 … e3


def test_cosine_of_identical_orthogonal_and_opposite_vectors():
    sims = cosine_similarity_matrix(torch.stack([E[0], E[0] * 5, E[1], -E[0]]), E[:1])
    assert sims.shape == (4, 1)
    assert sims[:, 0].tolist() == pytest.approx([1.0, 1.0, 0.0, -1.0])


def test_cosine_ignores_norms_and_handles_zero_vectors():
    a = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    b = torch.tensor([[6.0, 8.0], [1.0, 0.0]])
    sims = cosine_similarity_matrix(a, b)
    assert sims[0].tolist() == pytest.approx([1.0, 0.6])
    assert sims[1].tolist() == [0.0, 0.0]  # a zero vector has cosine 0 with everything
    assert l2_normalize(a)[0].tolist() == pytest.approx([0.6, 0.8])


def test_identity_similarity_is_the_mean_cosine_over_generated_images():
    assert identity_similarity(E[0], E[0].repeat(3, 1)) == pytest.approx(1.0)
    assert identity_similarity(E[0], E[1:3]) == pytest.approx(0.0)
    # cos = 1 and 0 -> mean 0.5; cos = 1/√2 for the diagonal vector
    assert identity_similarity(E[0], torch.stack([E[0], E[1]])) == pytest.approx(0.5)
    assert identity_similarity(E[0], (E[0] + E[1])[None]) == pytest.approx(2**-0.5)


def test_compositional_similarity_uses_the_same_mean_cosine():
    gen = torch.stack([E[0] + E[1], E[0], -E[0]])  # cos 1/√2, 1, -1
    assert compositional_similarity(E[0], gen) == pytest.approx((2**-0.5 + 1 - 1) / 3)
    assert compositional_similarity(E[2], E[2:3]) == pytest.approx(1.0)


def test_topk_top1_misses_and_top3_hits():
    prototypes = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [-1.0, 0, 0]])  # (P=4, D=3)
    # Query of concept 1 leaning towards concept 0: cosines 0.9, 0.5, 0.1, -0.9 (÷ norm) -> its own is 2nd.
    queries = torch.tensor([[0.9, 0.5, 0.1], [0.0, 0.0, 2.0]])
    labels = torch.tensor([1, 2])
    assert topk_correct(queries, labels, prototypes, 1).tolist() == [False, True]
    assert topk_correct(queries, labels, prototypes, 2).tolist() == [True, True]
    assert topk_correct(queries, labels, prototypes, 3).tolist() == [True, True]
    assert topk_accuracy(queries, labels, prototypes, 1) == pytest.approx(0.5)
    assert topk_accuracy(queries, labels, prototypes, 3) == pytest.approx(1.0)


def test_topk_third_place_is_a_top3_hit_and_not_a_top2_hit():
    prototypes = torch.eye(5)
    query = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.0]])  # own = prototype 2, ranked 3rd
    assert [topk_correct(query, torch.tensor([2]), prototypes, k).item() for k in (1, 2, 3)] == [False, False, True]


def test_topk_ties_count_against_the_query_and_large_k_is_always_correct():
    prototypes = torch.stack([E[0], E[0], E[1]])  # a duplicated prototype
    q = E[0][None]
    assert topk_correct(q, torch.tensor([0]), prototypes, 1).tolist() == [False]
    assert topk_correct(q, torch.tensor([1]), prototypes, 1).tolist() == [False]
    assert topk_correct(q, torch.tensor([0]), prototypes, 2).tolist() == [True]
    assert topk_correct(q, torch.tensor([2]), prototypes, 3).tolist() == [True]  # k >= P


@pytest.mark.parametrize(
    "call",
    [
        lambda: topk_correct(E[:1], torch.tensor([0]), E, 0),
        lambda: topk_correct(E[:1], torch.tensor([4]), E, 1),
        lambda: topk_correct(E[:2], torch.tensor([0]), E, 1),
        lambda: topk_correct(E[:1], torch.tensor([0.0]), E, 1),
        lambda: topk_accuracy(E[:0], torch.tensor([], dtype=torch.long), E, 1),
        lambda: cosine_similarity_matrix(E, torch.ones(2, 3)),
        lambda: identity_similarity(E, E),
        lambda: identity_similarity(E[0], E[:0]),
        lambda: identity_similarity(E[0], torch.full((1, 4), float("nan"))),
    ],
)
def test_bad_inputs_raise_value_errors(call):
    with pytest.raises(ValueError):
        call()


def test_metrics_accept_half_precision_and_return_python_floats():
    value = identity_similarity(E[0].half(), E[:2].half())
    assert isinstance(value, float) and value == pytest.approx(0.5)


def test_metrics_module_imports_no_model_library(heavy_imports):
    assert heavy_imports["conceptexpress.evaluate.metrics"] == []


def test_package_exports_resolve_lazily():
    import conceptexpress.evaluate as ev

    for name in ev.__all__:
        assert getattr(ev, name) is not None
