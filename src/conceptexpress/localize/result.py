"""What localization found in one image (paper §3.2): the :class:`Localization` result and its edits.

Pure: nothing here imports diffusers or the model layer; the UNet pass that produces a Localization is
:class:`conceptexpress.attention.localizer.ConceptLocalizer`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from .cluster import ConceptClusters


@dataclass(frozen=True)
class Localization:
    """What localization found in one image.

    ``clusters`` holds the latent-resolution result (masks (N, h, w) bool, centroids (N, h·w) float32 — the
    token lookup table's m_i and f_i, Eq. 6–7); ``masks`` are the same concepts at the source image's size,
    (N, H, W) bool, non-overlapping. ``eot`` is the raw [EOT] cross-attention map (h, w) float32. ``image`` is the
    RGB photo that was localized (what :func:`conceptexpress.learn_tokens` trains on).

    Concepts are numbered from 0 (concept ``i`` is ``masks[i]``; the overlay and mask files number from 1).
    :meth:`merge` and :meth:`drop` return new objects; the original is unchanged.
    """

    clusters: ConceptClusters
    masks: np.ndarray
    eot: torch.Tensor
    source_size: tuple[int, int]  # (W, H) of the photo after EXIF rotation
    work_size: tuple[int, int]  # (W, H) fed to the VAE
    latent_hw: tuple[int, int]
    self_attention_layers: int
    cross_attention_layers: int
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    image: Image.Image | None = field(default=None, repr=False, compare=False)

    @property
    def num_concepts(self) -> int:
        return self.clusters.num_concepts

    def _check(self, indices: tuple[int, ...], what: str, least: int) -> list[int]:
        n = self.num_concepts
        picked = sorted({int(i) for i in indices})
        if len(picked) < least or any(i < 0 or i >= n for i in picked) or len(picked) != len(indices):
            raise ConfigError(
                f"`{what}` needs {least} or more distinct concept indices in 0..{n - 1}, got {list(indices)}"
            )
        return picked

    def _keep(self, clusters: ConceptClusters, masks: np.ndarray) -> Localization:
        return dataclasses.replace(self, clusters=clusters, masks=masks)

    def merge(self, *indices: int) -> Localization:
        """One concept from ``indices`` (two or more), at the position of the first of them.

        The mask is the union; the centroid is Eq. 6 over the union, f = Σ_i |m_i| f_i / Σ_i |m_i| (each f_i
        being the mean attention row over its own mask).
        """
        picked = self._check(indices, "merge", 2)
        c = self.clusters
        areas = c.masks[picked].flatten(1).sum(1).float().clamp_min(1)  # (k,)
        merged_mask = c.masks[picked].any(0)  # (h, w)
        merged_centroid = (areas[:, None] * c.centroids[picked]).sum(0) / areas.sum()  # (h·w,)
        keep = [i for i in range(self.num_concepts) if i not in picked[1:]]
        masks = c.masks.clone()
        masks[picked[0]] = merged_mask
        centroids = c.centroids.clone()
        centroids[picked[0]] = merged_centroid
        post = c.post_labels.clone()
        for i in picked[1:]:
            post[c.post_labels == i] = picked[0]
        source = self.masks.copy()
        source[picked[0]] = self.masks[picked].any(0)
        return self._keep(
            dataclasses.replace(c, masks=masks[keep], centroids=centroids[keep], post_labels=_renumber(post, keep)),
            source[keep],
        )

    def drop(self, *indices: int) -> Localization:
        """The localization without the concepts ``indices`` (their pixels become background)."""
        picked = self._check(indices, "drop", 1)
        c = self.clusters
        keep = [i for i in range(self.num_concepts) if i not in picked]
        return self._keep(
            dataclasses.replace(
                c, masks=c.masks[keep], centroids=c.centroids[keep], post_labels=_renumber(c.post_labels, keep)
            ),
            self.masks[keep],
        )


def _renumber(labels: torch.Tensor, keep: list[int]) -> torch.Tensor:
    """Concept labels (h, w) with the concepts ``keep`` renumbered 0..len(keep)-1 and every other one -1."""
    table = torch.full((int(labels.max().clamp_min(0)) + 2,), -1, dtype=labels.dtype)
    table[torch.as_tensor(keep, dtype=torch.long)] = torch.arange(len(keep), dtype=labels.dtype)
    return torch.where(labels >= 0, table[labels.clamp_min(0)], labels.new_full((), -1))
