"""Evaluation metrics of paper §4.2 as pure functions on feature tensors (no model import here).

Every function takes features already extracted by one image encoder (CLIP or DINO, see
:mod:`conceptexpress.evaluate.encoders`): rows of a ``(N, D)`` float tensor, one per image. Features need not be
normalized; every similarity is the cosine

    cos(a, b) = a·b / (max(‖a‖, ε) · max(‖b‖, ε)),   ε = 1e-12,

so a zero vector has cosine 0 with everything (``torch.nn.functional.normalize`` semantics). Computations run in
float64 on CPU so that the reported means do not depend on the encoder's dtype or device.

Definitions (the symbols of paper Table 1):

- SIM^I (identity similarity) of concept i: ``(1/K) Σ_k cos(s_i, g_ik)`` with s_i the feature of the source image
  masked by the SAM mask of concept i and g_ik the feature of the k-th of K images generated with
  "a photo of [V_i]" (:func:`identity_similarity`).
- SIM^C (compositional similarity) of a source image: ``(1/K) Σ_k cos(s, g_k)`` with s the feature of the whole,
  unmasked source image and g_k the k-th of K images generated with "a photo of [V_1] and … [V_N]"
  (:func:`compositional_similarity`).
- ACC^k (top-k classification accuracy): prototypes p_1 … p_P are the features of every SAM-masked source concept of
  the dataset (one per concept); a query q (a generated single-concept image) with label y is correct when fewer
  than k *other* prototypes are at least as similar to q as p_y is, i.e. ``#{j ≠ y : cos(q, p_j) ≥ cos(q, p_y)} < k``.
  Ties therefore count against the query (a duplicated prototype never makes both copies correct at k = 1).
  ACC^k is the fraction of correct queries (:func:`topk_correct`, :func:`topk_accuracy`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "compositional_similarity",
    "cosine_similarity_matrix",
    "identity_similarity",
    "l2_normalize",
    "mean_cosine_similarity",
    "topk_accuracy",
    "topk_correct",
]

_EPS = 1e-12


def _features(x: Tensor, name: str, ndim: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != ndim:
        shape = "(D,)" if ndim == 1 else "(N, D)"
        raise ValueError(f"`{name}` must have shape {shape}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError(f"`{name}` holds NaN or infinite values")
    return x.detach().to("cpu", torch.float64)


def l2_normalize(x: Tensor) -> Tensor:
    """Rows of ``x`` (``(N, D)`` or ``(D,)``) divided by ``max(‖row‖₂, 1e-12)``; same shape and dtype."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_EPS)


def cosine_similarity_matrix(a: Tensor, b: Tensor) -> Tensor:
    """All cosine similarities between the rows of ``a`` ``(N, D)`` and ``b`` ``(M, D)``: ``(N, M)`` float64 in [-1, 1]."""
    a = _features(a, "a", 2)
    b = _features(b, "b", 2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature widths differ: `a` has D = {a.shape[1]}, `b` has D = {b.shape[1]}")
    return (l2_normalize(a) @ l2_normalize(b).T).clamp_(-1.0, 1.0)  # (N, M)


def mean_cosine_similarity(source_feat: Tensor, generated_feats: Tensor) -> float:
    """``(1/K) Σ_k cos(source_feat, generated_feats[k])`` for ``source_feat`` ``(D,)`` and ``generated_feats`` ``(K, D)``."""
    source = _features(source_feat, "source_feat", 1)
    generated = _features(generated_feats, "generated_feats", 2)
    if generated.shape[0] == 0:
        raise ValueError("`generated_feats` holds no image (K = 0); the mean similarity is undefined")
    return float(cosine_similarity_matrix(source[None], generated).mean())


def identity_similarity(source_feat: Tensor, generated_feats: Tensor) -> float:
    """SIM^I of one concept (paper §4.2): the mean cosine between the masked source concept and its generations.

    ``SIM^I_i = (1/K) Σ_k cos(s_i, g_ik)``, where ``s_i`` ``(D,)`` is the feature of the source image masked by the
    SAM mask of concept i and ``g_ik`` (row k of ``generated_feats``, ``(K, D)``) the feature of the k-th image
    generated with "a photo of [V_i]". Returns a float in [-1, 1].
    """
    return mean_cosine_similarity(source_feat, generated_feats)


def compositional_similarity(source_feat: Tensor, generated_feats: Tensor) -> float:
    """SIM^C of one source image (paper §4.2): the mean cosine between the source image and its recompositions.

    ``SIM^C = (1/K) Σ_k cos(s, g_k)``, where ``s`` ``(D,)`` is the feature of the whole, unmasked source image and
    ``g_k`` (row k of ``generated_feats``, ``(K, D)``) the feature of the k-th image generated with
    "a photo of [V_1] and [V_2] … [V_N]". Returns a float in [-1, 1].
    """
    return mean_cosine_similarity(source_feat, generated_feats)


def topk_correct(query_feats: Tensor, query_labels: Tensor, prototypes: Tensor, k: int) -> Tensor:
    """Which queries the nearest-prototype classifier gets right within its top ``k`` (paper §4.2, ACC^k).

    Args:
        query_feats: ``(Q, D)`` features of the generated single-concept images.
        query_labels: ``(Q,)`` integer index into ``prototypes`` of each query's own concept.
        prototypes: ``(P, D)`` features of every SAM-masked source concept of the dataset, one row per concept.
        k: how many of the most similar prototypes count (``k >= 1``; ``k >= P`` makes every query correct).

    Returns:
        ``(Q,)`` bool tensor: query q is correct when ``#{j ≠ y_q : cos(q, p_j) ≥ cos(q, p_{y_q})} < k``
        (ties count against the query).
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
    sims = cosine_similarity_matrix(query_feats, prototypes)  # (Q, P)
    if not isinstance(query_labels, Tensor) or query_labels.ndim != 1 or query_labels.is_floating_point():
        raise ValueError("`query_labels` must be a 1-D integer tensor (Q,)")
    labels = query_labels.detach().to("cpu", torch.long)
    if labels.shape[0] != sims.shape[0]:
        raise ValueError(f"`query_labels` has {labels.shape[0]} entries for {sims.shape[0]} queries")
    if labels.numel() and (labels.min() < 0 or labels.max() >= sims.shape[1]):
        raise ValueError(f"`query_labels` must index the {sims.shape[1]} prototypes, got values outside [0, {sims.shape[1]})")
    own = sims.gather(1, labels[:, None])  # (Q, 1)
    # Prototypes at least as similar as the query's own one, the own one itself excluded.
    rivals = (sims >= own).sum(dim=1) - 1  # (Q,)
    return rivals < k


def topk_accuracy(query_feats: Tensor, query_labels: Tensor, prototypes: Tensor, k: int) -> float:
    """ACC^k (paper §4.2): the fraction of queries whose own prototype is among the ``k`` most similar.

    Same arguments as :func:`topk_correct`; returns ``topk_correct(...).float().mean()`` as a float in [0, 1].
    """
    correct = topk_correct(query_feats, query_labels, prototypes, k)
    if correct.numel() == 0:
        raise ValueError("`query_feats` holds no query (Q = 0); the accuracy is undefined")
    return float(correct.double().mean())
