"""SAM masks of the extracted concepts (paper §4.2) and the masked source images the metrics compare.

For each concept the paper "prompt[s] SAM with 3 randomly sampled points on our extracted mask"; the source image
masked with that SAM mask is the reference of SIM^I and a prototype of ACC^k. Precisely:

1. Points (:func:`sample_mask_points`): ``n_points`` distinct pixels drawn uniformly without replacement from the
   pixels of the extracted mask (all of them when it has fewer), by ``numpy.random.default_rng(seed)`` seeded
   afresh for every concept, so a concept's points depend only on its mask and the seed (not on the order or
   number of concepts). A pixel (row y, column x) is passed as its centre ``(x + 0.5, y + 0.5)`` in source-image
   pixel coordinates, the convention of SAM's own point grids.
2. SAM (:class:`SamMasker`): all points form one prompt (labels 1 = foreground) with ``multimask_output=True``;
   of SAM's 3 candidate masks the one with the highest predicted IoU (``iou_scores`` argmax) is kept, upsampled to
   the source size by the processor's ``post_process_masks`` and binarized at logit 0.
3. Masked image (:func:`masked_concept_image`): pixels outside the SAM mask are set to black (0, 0, 0). With
   ``crop=False`` (default, the paper's wording: "the training image is then masked") the image keeps its size;
   with ``crop=True`` it is cut to the mask's bounding box and padded with black to a centred square, so the
   concept fills the frame like the generated "a photo of [V_i]" images and no encoder centre-crop cuts it.

The image embedding of SAM is computed once per photo and shared by its concepts (:meth:`SamMasker.predict_many`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..config import DEFAULT_SAM
from ..errors import ConfigError
from ..models.hf import check_source, load_or_fail, pil_image_processor

__all__ = [
    "DEFAULT_SAM",
    "SamMasker",
    "SamPrediction",
    "bounding_box",
    "masked_concept_image",
    "sample_mask_points",
]

_ALTERNATIVES = (
    f"pass --sam a hub id (default {DEFAULT_SAM!r}, or the smaller 'facebook/sam-vit-base') or a local folder saved "
    "with save_pretrained (offline: download it once, or use conceptexpress.evaluate.testing.save_tiny_sam for a "
    "random test model)"
)


def _bool_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D (H, W) array, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def sample_mask_points(mask: np.ndarray, n_points: int = 3, seed: int | np.random.Generator = 0) -> np.ndarray:
    """``n_points`` distinct pixels of ``mask`` drawn uniformly, as pixel centres ``(x + 0.5, y + 0.5)``.

    Args:
        mask: ``(H, W)`` bool (or 0/1) array, the extracted concept mask at the source image's size.
        n_points: how many points (fewer when the mask has fewer pixels).
        seed: an int (a fresh ``numpy.random.default_rng(seed)``) or a Generator to draw from.

    Returns:
        ``(n, 2)`` float64 array of ``(x, y)`` in source-image pixel coordinates, in draw order.

    Raises:
        ValueError: the mask is empty or not 2-D, or ``n_points < 1``.
    """
    if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1:
        raise ValueError(f"`n_points` must be an integer >= 1, got {n_points!r}")
    mask = _bool_mask(mask)
    flat = np.flatnonzero(mask)  # row-major pixel indices, a fixed order for a given mask
    if flat.size == 0:
        raise ValueError("`mask` is empty: no pixel to sample a point from")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    picked = rng.choice(flat, size=min(n_points, flat.size), replace=False)
    ys, xs = np.divmod(picked, mask.shape[1])
    return np.stack([xs + 0.5, ys + 0.5], axis=1).astype(np.float64)  # (n, 2) as (x, y)


def bounding_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the True pixels of ``(H, W)`` ``mask``, right/bottom exclusive (PIL order)."""
    mask = _bool_mask(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("`mask` is empty: it has no bounding box")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def masked_concept_image(image: Image.Image, mask: np.ndarray, crop: bool = False) -> Image.Image:
    """The source image with every pixel outside ``mask`` set to black (0, 0, 0).

    Args:
        image: the source photo (any mode; converted to RGB), ``W × H``.
        mask: ``(H, W)`` bool array (True = the concept).
        crop: False: the result is ``W × H``. True: cut to the mask's bounding box, then padded with black to a
            square of side max(box width, box height) with the box centred.

    Returns:
        A new RGB PIL image. An empty mask gives an all-black ``W × H`` image (``crop`` is then ignored).
    """
    rgb = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    mask = _bool_mask(mask)
    if mask.shape != rgb.shape[:2]:
        raise ValueError(f"`mask` has shape {mask.shape} but the image is {rgb.shape[1]}x{rgb.shape[0]} (W x H)")
    out = np.where(mask[..., None], rgb, 0).astype(np.uint8)
    if not crop or not mask.any():
        return Image.fromarray(out)
    left, top, right, bottom = bounding_box(mask)
    box = out[top:bottom, left:right]
    h, w = box.shape[:2]
    side = max(h, w)
    square = np.zeros((side, side, 3), np.uint8)
    y0, x0 = (side - h) // 2, (side - w) // 2
    square[y0 : y0 + h, x0 : x0 + w] = box
    return Image.fromarray(square)


@dataclass(frozen=True)
class SamPrediction:
    """One SAM answer: the kept mask ``(H, W)`` bool at the source size, its predicted IoU, the prompt points."""

    mask: np.ndarray
    score: float
    points: np.ndarray  # (n, 2) (x, y) pixel coordinates of the source image


class SamMasker:
    """Segment Anything (transformers ``SamModel`` + ``SamProcessor``), prompted with points of a concept mask.

    Weights load lazily on first use; a model that cannot be loaded raises ``ModelLoadError`` in one line.

        >>> sam = SamMasker("facebook/sam-vit-huge", device="cuda")
        >>> mask = sam.mask_from_points(image, concept_mask, n_points=3, seed=0)   # (H, W) bool
    """

    def __init__(self, model_id_or_path: str | None = None, *, device: str | torch.device = "cpu"):
        self.model_id = model_id_or_path or DEFAULT_SAM
        self.device = torch.device(device)
        self._model: Any = None
        self._processor: Any = None

    def __repr__(self) -> str:
        return f"SamMasker({self.model_id!r}, device={str(self.device)!r})"

    def check(self) -> None:
        """Fail fast (ModelLoadError) when the model id is empty or names a local folder that does not exist."""
        check_source("SAM model", self.model_id, _ALTERNATIVES)

    def load(self) -> SamMasker:
        """Load weights and processor now (idempotent). Raises ModelLoadError."""
        if self._model is None:

            def load(source: str):
                from transformers import SamModel, SamProcessor

                processor = SamProcessor(image_processor=pil_image_processor("SamImageProcessor", source))
                return SamModel.from_pretrained(source), processor

            model, self._processor = load_or_fail("SAM model", self.model_id, _ALTERNATIVES, load)
            self._model = model.to(self.device).eval().requires_grad_(False)
        return self

    def unload(self) -> None:
        """Drop the weights (the next call loads them again)."""
        self._model = self._processor = None

    def predict_many(self, image: Image.Image, points: Sequence[np.ndarray]) -> list[SamPrediction]:
        """One SAM prediction per prompt in ``points`` (each ``(n, 2)`` ``(x, y)`` foreground points) on ``image``.

        The image is embedded once. For each prompt SAM returns 3 candidate masks; the one with the highest
        predicted IoU is upsampled to the image size and binarized at logit 0.
        """
        self.load()
        rgb = image.convert("RGB")
        if not points:
            return []
        inputs = self._processor(images=rgb, return_tensors="pt")
        dtype = next(self._model.parameters()).dtype
        with torch.inference_mode():
            embedding = self._model.get_image_embeddings(inputs["pixel_values"].to(self.device, dtype))
        results = []
        for pts in points:
            pts = np.asarray(pts, dtype=np.float64)
            if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
                raise ValueError(f"each prompt must be an (n, 2) array of (x, y) points, got shape {pts.shape}")
            prompt = self._processor(
                images=rgb, input_points=[[pts.tolist()]], input_labels=[[[1] * len(pts)]], return_tensors="pt"
            )
            with torch.inference_mode():
                out = self._model(
                    image_embeddings=embedding,
                    input_points=prompt["input_points"].to(self.device, dtype),  # (1, 1, n, 2)
                    input_labels=prompt["input_labels"].to(self.device),  # (1, 1, n)
                    multimask_output=True,
                )
            scores = out.iou_scores[0, 0].float().cpu()  # (3,)
            best = int(scores.argmax())
            masks = self._processor.post_process_masks(
                out.pred_masks.float().cpu(), prompt["original_sizes"], prompt["reshaped_input_sizes"]
            )[0]  # (1, 3, H, W) bool
            results.append(SamPrediction(mask=masks[0, best].numpy().astype(bool), score=float(scores[best]), points=pts))
        return results

    def masks_from_points(
        self, image: Image.Image, concept_masks: Sequence[np.ndarray], n_points: int = 3, seed: int = 0
    ) -> list[SamPrediction]:
        """SAM predictions for several concept masks of one image; the points of each mask are drawn with ``seed``."""
        if isinstance(n_points, bool) or not isinstance(n_points, int) or n_points < 1:
            raise ConfigError(f"`n_points` must be an integer >= 1, got {n_points!r}")
        size = (image.height, image.width)
        prompts = []
        for i, m in enumerate(concept_masks):
            m = _bool_mask(m, f"concept_masks[{i}]")
            if m.shape != size:
                raise ValueError(f"concept mask {i} has shape {m.shape} but the image is {size[1]}x{size[0]} (W x H)")
            prompts.append(sample_mask_points(m, n_points, seed))
        return self.predict_many(image, prompts)

    def mask_from_points(
        self, image: Image.Image, concept_mask: np.ndarray, n_points: int = 3, seed: int | np.random.Generator = 0
    ) -> np.ndarray:
        """The SAM mask ``(H, W)`` bool of one concept: ``n_points`` points sampled from ``concept_mask`` (seeded)."""
        points = sample_mask_points(_bool_mask(concept_mask, "concept_mask"), n_points, seed)
        return self.predict_many(image, [points])[0].mask
