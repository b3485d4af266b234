"""Image encoders of the evaluation (paper §4.2: CLIP and DINO), thin adapters around transformers.

Each encoder maps PIL images to L2-normalized float32 features ``(B, D)`` on CPU, preprocessing with the model's
own image processor (PIL backend: torchvision is not needed):

- :class:`ClipImageEncoder`: ``CLIPVisionModelWithProjection(...).image_embeds``, i.e. the projected image embedding
  CLIP compares with text (= ``CLIPModel.get_image_features``); default ``openai/clip-vit-base-patch32``. The
  processor resizes the shorter side and centre-crops (224 px for the default).
- :class:`DinoImageEncoder`: the [CLS] token of ``ViTModel``'s last layer (after its final layer norm), the
  feature DINO's k-NN evaluation uses; default ``facebook/dino-vits16``. The processor resizes to a square (224 px).

Weights load lazily on the first :meth:`encode` (or :meth:`load`), so building an encoder costs nothing; a model
that cannot be loaded (offline, typo) raises :class:`~conceptexpress.errors.ModelLoadError` in one line.

    >>> enc = ClipImageEncoder("openai/clip-vit-base-patch32")
    >>> enc.encode([img1, img2]).shape          # (2, 512), rows of unit norm
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..config import DEFAULT_CLIP, DEFAULT_DINO
from ..errors import ConfigError
from ..models.hf import check_source, load_or_fail, pil_image_processor

if TYPE_CHECKING:
    from PIL import Image

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_DINO",
    "ENCODERS",
    "ClipImageEncoder",
    "DinoImageEncoder",
    "ImageEncoder",
    "build_encoder",
]



@runtime_checkable
class ImageEncoder(Protocol):
    """What the evaluation needs from an encoder: a short name, the model it records, and ``encode``."""

    name: str
    model_id: str

    def encode(self, images: Sequence[Image.Image]) -> Tensor:
        """``(B, D)`` float32 CPU features of ``images``, each row of unit L2 norm."""
        ...


class _TransformersImageEncoder:
    """Shared lazy loading, batching and normalization; subclasses say which model and which feature."""

    name = ""
    default_id = ""
    processor_class = ""
    alternatives = ""

    def __init__(self, model_id_or_path: str | None = None, *, device: str | torch.device = "cpu", batch_size: int = 32):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"`batch_size` must be an integer >= 1, got {batch_size!r}")
        self.model_id = model_id_or_path or self.default_id
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._model: Any = None
        self._processor: Any = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.model_id!r}, device={str(self.device)!r})"

    # ----------------------------------------------------------------------------- subclass hooks
    def _load_model(self, source: str) -> Any:
        raise NotImplementedError

    def _features(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    # ----------------------------------------------------------------------------- public
    def check(self) -> None:
        """Fail fast (ModelLoadError) when the model id is empty or names a local folder that does not exist."""
        check_source(f"{self.name.upper()} image encoder", self.model_id, self.alternatives)

    def load(self):
        """Load weights and processor now (idempotent); returns ``self``. Raises ModelLoadError."""
        if self._model is None:
            what = f"{self.name.upper()} image encoder"

            def load(source: str):
                processor = pil_image_processor(self.processor_class, source)
                model = self._load_model(source)
                return model, processor

            model, self._processor = load_or_fail(what, self.model_id, self.alternatives, load)
            self._model = model.to(self.device).eval().requires_grad_(False)
        return self

    def unload(self) -> None:
        """Drop the weights (the next :meth:`encode` loads them again)."""
        self._model = self._processor = None

    @property
    def dtype(self) -> torch.dtype:
        return next(self.load()._model.parameters()).dtype

    def encode(self, images: Sequence[Image.Image]) -> Tensor:
        """Features of ``images`` (PIL, any mode; converted to RGB): ``(B, D)`` float32 on CPU, unit L2 norm per row.

        Images are processed in batches of ``batch_size``; the result does not depend on the batch size beyond
        floating-point rounding.
        """
        if isinstance(images, str) or not isinstance(images, Sequence) or len(images) == 0:
            raise ValueError(f"`images` must be a non-empty list of PIL images, got {type(images).__name__}")
        self.load()
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start : start + self.batch_size]]
            pixel_values = self._processor(images=batch, return_tensors="pt")["pixel_values"]  # (b, 3, S, S)
            with torch.inference_mode():
                feats = self._features(pixel_values.to(self.device, self.dtype))  # (b, D)
            out.append(feats.float().cpu())
        feats = torch.cat(out)  # (B, D)
        return feats / feats.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ClipImageEncoder(_TransformersImageEncoder):
    """CLIP image embedding (vision tower + visual projection), the paper's "CLIP" rows of Table 1."""

    name = "clip"
    default_id = DEFAULT_CLIP
    processor_class = "CLIPImageProcessor"
    alternatives = (
        f"pass --clip a hub id (default {DEFAULT_CLIP!r}, or e.g. 'openai/clip-vit-large-patch14') or a local folder "
        "saved with save_pretrained (offline: download it once, or use conceptexpress.evaluate.testing.save_tiny_clip "
        "for a random test model), or leave clip out of --encoders"
    )

    def _load_model(self, source: str):
        from transformers import CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection.from_pretrained(source)

    def _features(self, pixel_values: Tensor) -> Tensor:
        return self._model(pixel_values=pixel_values).image_embeds  # (b, projection_dim)


class DinoImageEncoder(_TransformersImageEncoder):
    """DINO ViT [CLS] feature of the last layer, the paper's "DINO" rows of Table 1."""

    name = "dino"
    default_id = DEFAULT_DINO
    processor_class = "ViTImageProcessor"
    alternatives = (
        f"pass --dino a hub id (default {DEFAULT_DINO!r}, or e.g. 'facebook/dino-vitb16') or a local folder saved with "
        "save_pretrained (offline: download it once, or use conceptexpress.evaluate.testing.save_tiny_dino for a "
        "random test model), or leave dino out of --encoders"
    )

    def _load_model(self, source: str):
        from transformers import ViTModel

        # DINO checkpoints carry no trained pooler; the [CLS] token of the last hidden state is the feature.
        return ViTModel.from_pretrained(source, add_pooling_layer=False)

    def _features(self, pixel_values: Tensor) -> Tensor:
        return self._model(pixel_values=pixel_values).last_hidden_state[:, 0]  # (b, hidden)


ENCODERS: dict[str, type[_TransformersImageEncoder]] = {"clip": ClipImageEncoder, "dino": DinoImageEncoder}


def build_encoder(name: str, model_id_or_path: str | None = None, *, device: str | torch.device = "cpu") -> ImageEncoder:
    """The encoder called ``name`` (``"clip"`` or ``"dino"``) for ``model_id_or_path`` (default: its default id)."""
    if name not in ENCODERS:
        raise ConfigError(f"unknown encoder {name!r}; choose from {', '.join(ENCODERS)}")
    return ENCODERS[name](model_id_or_path, device=device)
