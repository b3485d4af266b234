"""End-to-end concept localization (paper §3.2): image → one UNet pass → attention → concepts.

The expensive step (VAE encode + one UNet pass with attention capture) runs once per image; the clustering
that follows is the pure core of :mod:`conceptexpress.localize`. Deterministic: the latent is the VAE
posterior *mean* (no sample) and the image is not flipped (the released code does both at random).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ..config import LocalizeConfig
from ..errors import ConfigError
from ..io.images import image_to_tensor, load_image, model_input_size, upsample_masks
from ..localize import ConceptClusters, cluster_concepts, eot_filter
from ..localize.result import Localization
from ..models import load_pipeline
from ..models.family import family_of
from ..models.text import eot_index
from .aggregate import CrossAttentionAccumulator, SelfAttentionAccumulator
from .capture import capture_attention

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttentionMaps:
    """Output of the localization pass: ``attn`` (h·w, h·w) float32 row-stochastic, ``eot`` (h, w) float32 raw."""

    attn: torch.Tensor
    eot: torch.Tensor
    work_size: tuple[int, int]
    latent_hw: tuple[int, int]
    self_attention_layers: int
    cross_attention_layers: int
    timings: dict[str, float] = field(default_factory=dict)


class ConceptLocalizer:
    """Locates the concepts of images with a loaded pipeline (reuse it for many images)."""

    def __init__(self, pipe: StableDiffusionPipeline, config: LocalizeConfig | None = None):
        self.pipe = pipe
        self.config = config or LocalizeConfig()
        self.family = family_of(pipe)  # refuses a pipeline of no supported family, before any work
        self.vae_factor = self.family.vae_factor(pipe)
        self.native_resolution = self.family.native_resolution(pipe)

    @property
    def resolution(self) -> int:
        return self.config.resolution or self.native_resolution

    @torch.no_grad()
    def attention(self, image: Image.Image) -> AttentionMaps:
        """The expensive step: VAE encode + one UNet pass with capture (paper §3.2, §3.4).

        Returns the aggregated self-attention (h·w, h·w) (rows sum to 1) and the raw [EOT] map (h, w), both
        float32 on CPU, on the finest self-attention grid (h, w) — the latent for SD 1.x/2.x, latent/2 for SDXL
        (:meth:`~conceptexpress.models.family.ModelFamily.clustering_grid`); ``AttentionMaps.latent_hw`` is that
        grid. Clustering methods (ours, and the k-means / FINCH baselines of the localization benchmark) all
        start from these same tensors.
        """
        pipe, cfg, family = self.pipe, self.config, self.family
        image = image.convert("RGB")
        work_size = model_input_size(image.size, self.resolution, self.vae_factor)
        device, dtype = pipe.unet.device, pipe.unet.dtype
        clock = _Clock(device)

        # 1. Clean latent: posterior mean, no noise (timestep 0 of paper §3.4).
        pixels = image_to_tensor(image, work_size).to(device=device, dtype=pipe.vae.dtype)  # (1, 3, H, W)
        latent = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor  # (1, 4, h, w)
        latent = latent.to(dtype)
        latent_hw = (latent.shape[-2], latent.shape[-1])
        grid_hw = family.clustering_grid(pipe, latent_hw)
        clock.lap("encode")

        # 2. The unconditional prompt "" (every text encoder of the family; SDXL: pooled embedding and time ids
        # from the photo's size) and the position of its [EOT] token.
        time_ids = family.micro_conditioning((image.height, image.width), (work_size[1], work_size[0]))
        cond = family.encode(pipe, family.tokenize(pipe, [""]), time_ids=time_ids)  # context (1, L, ΣD)
        eot = eot_index(pipe.tokenizer, "")

        # 3. One UNet pass with self-attention aggregated on the fly onto the clustering grid (heads averaged as
        # they are captured) and the [EOT] map at latent/4.
        self_acc = SelfAttentionAccumulator(grid_hw, weighting=cfg.weighting)
        cross_acc = CrossAttentionAccumulator(grid_hw, [eot])
        t = torch.full((1,), cfg.timestep, device=device, dtype=torch.long)
        with capture_attention(
            pipe.unet, latent_hw, self_attention=self_acc, cross_attention=cross_acc,
            cross_downsample=family.cross_attention_divisor, head_chunk=family.localize_head_chunk,
        ):
            pipe.unet(latent, t, **family.unet_kwargs(cond))
        attn = self_acc.result()[0].float().cpu()  # (h·w, h·w), rows sum to 1
        eot_map = cross_acc.result()[0, 0].float().cpu()  # (h, w)
        clock.lap("unet")
        return AttentionMaps(
            attn=attn,
            eot=eot_map,
            work_size=work_size,
            latent_hw=grid_hw,
            self_attention_layers=self_acc.num_layers,
            cross_attention_layers=cross_acc.num_layers,
            timings=clock.laps,
        )

    def __call__(self, image: Image.Image | str | Path) -> Localization:
        if not isinstance(image, Image.Image):
            image = load_image(image)
        image = image.convert("RGB")
        maps = self.attention(image)
        clock = _Clock(self.pipe.unet.device)

        # 4. Pre-clustering, filtering, post-clustering (pure core).
        clusters = cluster_concepts(
            maps.attn, maps.eot, n_max=self.config.n_max, clustering=self.config.clustering
        )
        for message in clusters.messages:
            logger.warning(message)
        clock.lap("cluster")
        masks = upsample_masks(clusters.masks.numpy(), image.size)
        clock.lap("upsample")
        return _localization(maps, clusters, masks, image, clock)

    def from_masks(self, image: Image.Image | str | Path, masks: np.ndarray, *, threshold: float = 0.5) -> Localization:
        """The user's masks as a Localization, clustering skipped (``extract --masks DIR``).

        The same attention pass as :meth:`__call__` gives the [EOT] map and the centroids, which ConceptExpress's
        attention alignment needs: f_i = m_i·A / |m_i|, the mean self-attention row over the latent mask (Eq. 6).
        A latent pixel belongs to mask i when more than ``threshold`` of its area is covered (area averaging of
        the source-size mask); concepts keep the masks' order. The source-size masks are the user's, unchanged.

        Args:
            image: the photo.
            masks: (N, H, W) bool at the photo's size ``(W, H)``, non-empty, pairwise disjoint
                (:func:`conceptexpress.io.masks.read_mask_folder` gives them so).

        Raises:
            ConfigError: ``masks`` is not (N, H, W) at the photo's size, or a mask covers no latent pixel.
        """
        if not isinstance(image, Image.Image):
            image = load_image(image)
        image = image.convert("RGB")
        masks = np.asarray(masks).astype(bool, copy=False)
        w, h = image.size
        if masks.ndim != 3 or masks.shape[0] < 1 or masks.shape[1:] != (h, w):
            raise ConfigError(f"`masks` must be (N, H, W) = (N, {h}, {w}) for a {w}x{h} photo, got {masks.shape}")
        maps = self.attention(image)
        clock = _Clock(self.pipe.unet.device)
        lh, lw = maps.latent_hw
        n = masks.shape[0]
        cover = torch.nn.functional.interpolate(
            torch.from_numpy(masks).float()[:, None], size=(lh, lw), mode="area"
        )[:, 0]  # (N, h, w) covered fraction of each latent pixel
        latent = cover > threshold  # disjoint: two disjoint masks cannot both cover more than half of a pixel
        for i in range(n):
            if not bool(latent[i].any()):
                raise ConfigError(
                    f"mask {i + 1} covers no latent pixel more than half (one latent pixel is {w / lw:.0f}x{h / lh:.0f} "
                    "source pixels); draw it larger"
                )
        post = torch.full((lh, lw), -1, dtype=torch.long)
        for i in range(n):
            post[latent[i]] = i
        # One region per mask and one for the background: the stages picture shows them as "pre-clusters".
        pre = torch.where(post >= 0, post, torch.full_like(post, n))
        regions = n + int(bool((post < 0).any()))
        rows = maps.attn.float()  # (h·w, h·w)
        centroids = torch.stack([rows[latent[i].reshape(-1)].mean(0) for i in range(n)])  # (N, h·w), Eq. 6
        filt = eot_filter(pre, maps.eot, regions)
        clusters = ConceptClusters(
            masks=latent,
            centroids=centroids.float(),
            pre_labels=pre,
            kept=torch.arange(regions) < n,
            post_labels=post,
            scores=filt.scores.float(),
            threshold=filt.threshold,
            eot=filt.eot.reshape(lh, lw).float(),
            delta=None,
            pre_level=0,
            levels=(regions,),
            messages=(f"user masks: {n} concepts given, clustering skipped",),
            clustering="paper",
        )
        clock.lap("masks")
        return dataclasses.replace(_localization(maps, clusters, masks.copy(), image, clock), from_user_masks=True)


class _Clock:
    """Wall-clock laps (synchronizing CUDA so that GPU work is charged to its stage)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 4)
        self._t = now


def _localization(maps: AttentionMaps, clusters, masks: np.ndarray, image: Image.Image, clock) -> Localization:
    """The result of one localization pass: ``clusters`` and their full-size ``masks``, with the pass's maps."""
    return Localization(
        clusters=clusters,
        masks=masks,
        eot=maps.eot,
        source_size=image.size,
        work_size=maps.work_size,
        latent_hw=maps.latent_hw,
        self_attention_layers=maps.self_attention_layers,
        cross_attention_layers=maps.cross_attention_layers,
        timings={**maps.timings, **clock.laps},
        image=image,
    )


def localize_concepts(
    image: Image.Image | str | Path,
    pipe: StableDiffusionPipeline | None = None,
    config: LocalizeConfig | None = None,
    **model_options,
) -> Localization:
    """One-call localization; loads the default (or ``model_options``) pipeline when none is given."""
    if pipe is None:
        pipe = load_pipeline(**model_options)
    return ConceptLocalizer(pipe, config)(image)
