"""Concept localization (paper §3.2) as pure functions on tensors: no diffusers or transformers import here.

>>> from conceptexpress.localize import cluster_concepts
>>> result = cluster_concepts(attn, eot, n_max=10)  # attn (h*w, h*w) row-stochastic, eot (h, w) raw
>>> result.masks, result.centroids  # (N, h, w) bool, (N, h*w) float32 (Eq. 6 with clustering="paper")
"""

from .cluster import ConceptClusters, cluster_concepts
from .eot_filter import EotFilter, eot_filter
from .finch import FinchLevel, finch
from .kl import cross_symmetric_kl, pairwise_symmetric_kl

__all__ = [
    "ConceptClusters",
    "EotFilter",
    "eot_filter",
    "FinchLevel",
    "cluster_concepts",
    "cross_symmetric_kl",
    "finch",
    "pairwise_symmetric_kl",
]
