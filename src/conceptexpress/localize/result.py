"""What localization found in one image (paper §3.2): the :class:`Localization` result and its edits.

Pure: nothing here imports diffusers or the model layer; the UNet pass that produces a Localization is
:class:`conceptexpress.attention.localizer.ConceptLocalizer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from .cluster import ConceptClusters
from .edit import drop_concepts, merge_concepts


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
    from_user_masks: bool = False  # the concepts are the user's masks (ConceptLocalizer.from_masks), not clusters

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

    def merge(self, *indices: int) -> Localization:
        """One concept from ``indices`` (two or more): the union of their masks.

        The one merge rule of the package (:func:`conceptexpress.localize.edit.merge_concepts`, also what
        ``conceptexpress edit --merge`` and the web UI run): the centroid follows the localization's clustering
        rule (Eq. 6 over the union for ``"paper"``; the released code's per-pre-cluster mean for ``"released"``),
        and concepts are renumbered in raster order of their first pixel, as localization numbers them.
        """
        self._check(indices, "merge", 2)
        return merge_concepts(self, list(indices))

    def drop(self, *indices: int) -> Localization:
        """The localization without the concepts ``indices`` (their pixels become background).

        :func:`conceptexpress.localize.edit.drop_concepts`, as ``conceptexpress edit --drop`` runs it.
        """
        self._check(indices, "drop", 1)
        return drop_concepts(self, list(indices))
