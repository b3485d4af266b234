"""MaskCut, the training-free reference column "MC" of paper Table 3 (CutLER, Wang et al. 2023, §3.1).

Normalized cuts (Shi & Malik 2000) on the patch-affinity graph of a self-supervised DINO ViT, repeated on the
patches not yet taken to find up to N objects per image. Written from the CutLER paper and its ``maskcut.py``;
the definitions and the places where this version differs are in ``docs/localization-benchmark.md``.

Layout:

- :func:`affinity_graph`, :func:`second_eigenvector`, :func:`normalized_cut`, :func:`maskcut_masks` are pure
  functions on a ``(n, d)`` feature matrix laid out on an ``(h, w)`` patch grid (raster order): no model.
- :class:`MaskCut` is the thin adapter around a transformers ``ViTModel`` (default ``facebook/dino-vits8``):
  lazy loading, preprocessing, key features of the last layer, then :func:`maskcut_masks`.

CutLER's dense CRF post-processing is not used: every benchmark row is scored on its raw masks brought to the
image size by the same ``upsample_masks``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from scipy import ndimage
from scipy.linalg import eigh
from torch import Tensor

from conceptexpress.errors import ConfigError
from conceptexpress.models.hf import load_or_fail

__all__ = [
    "DEFAULT_MASKCUT_MODEL",
    "MaskCut",
    "MaskCutResult",
    "NormalizedCut",
    "affinity_graph",
    "maskcut_masks",
    "normalized_cut",
    "second_eigenvector",
]

DEFAULT_MASKCUT_MODEL = "facebook/dino-vits8"
# DINO was trained on ImageNet-normalized inputs; CutLER normalizes with the same constants.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class NormalizedCut:
    """One normalized cut of a patch graph.

    Attributes:
        eigenvector: (n,) float64 second-smallest generalized eigenvector y of (D - W) y = λ D y, scaled so that
            yᵀ D y = 1 and signed so that its entry of largest magnitude is positive.
        eigenvalue: λ of ``eigenvector`` (0 <= λ <= 2; small = a good cut).
        partition: (n,) bool, y > mean(y): one side of the bipartition.
        seed: index of the patch with the largest |y|.
        flipped: True when the seed's side held more than ``max_corners`` grid corners and the other side was taken.
        foreground: (n,) bool, the chosen side (restricted to the seed's 4-connected component when ``connected``);
            all False when the cut is empty (see :func:`normalized_cut`).
    """

    eigenvector: np.ndarray
    eigenvalue: float
    partition: np.ndarray
    seed: int
    flipped: bool
    foreground: np.ndarray


@dataclass(frozen=True)
class MaskCutResult:
    """MaskCut on one image.

    Attributes:
        masks: (M, h, w) bool masks on the patch grid, pairwise disjoint, in the order found; M <= ``num_masks``.
        grid: (h, w) patch grid of the resized image.
        cuts: the normalized cut of every round run, including a final rejected one.
        messages: why the search stopped before ``num_masks`` masks, if it did.
    """

    masks: np.ndarray
    grid: tuple[int, int]
    cuts: tuple[NormalizedCut, ...]
    messages: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- pure functions
def affinity_graph(features: Tensor | np.ndarray, tau: float = 0.15, eps: float = 1e-5) -> np.ndarray:
    """Binary cosine affinity of CutLER: W_ij = 1 if cos(f_i, f_j) > tau else eps.

    Args:
        features: (n, d) patch features, any float dtype. An all-zero row (a masked-out patch) has cosine 0 with
            everything, so it keeps only eps edges (itself included, for tau >= 0).
        tau: cosine threshold (CutLER's MaskCut: 0.15).
        eps: weight of the edges below the threshold; keeps the graph connected so that D is invertible.

    Returns:
        (n, n) float64 symmetric W.
    """
    f = torch.as_tensor(features).detach().to("cpu", torch.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"`features` must be (n, d) with n >= 2, got shape {tuple(f.shape)}")
    f = f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)  # zero rows stay zero
    cos = (f @ f.T).numpy()  # (n, n)
    return np.where(cos > tau, 1.0, eps)


def second_eigenvector(w: np.ndarray) -> tuple[np.ndarray, float]:
    """Second-smallest solution of (D - W) y = λ D y, D = diag(W 1) (Shi & Malik's relaxed normalized cut).

    Solved in the equivalent symmetric form (I - D^-1/2 W D^-1/2) z = λ z, y = D^-1/2 z, with LAPACK on the two
    smallest eigenpairs only. y is scaled to yᵀ D y = 1 and signed so that its largest-magnitude entry is
    positive (the eigensolver's sign is arbitrary; nothing downstream depends on it).

    Returns:
        ``(y (n,) float64, λ)``.
    """
    d = w.sum(axis=1)  # (n,)
    s = 1.0 / np.sqrt(d)
    lap = np.eye(len(d)) - s[:, None] * w * s[None, :]  # (n, n) normalized Laplacian
    values, vectors = eigh(lap, subset_by_index=[0, 1])  # ascending
    y = vectors[:, 1] * s
    y = y / np.sqrt(np.sum(d * y * y))
    if y[np.argmax(np.abs(y))] < 0:
        y = -y
    return y, float(values[1])


def normalized_cut(
    features: Tensor | np.ndarray,
    grid: tuple[int, int],
    *,
    tau: float = 0.15,
    eps: float = 1e-5,
    max_corners: int = 2,
    connected: bool = True,
) -> NormalizedCut:
    """One MaskCut round (CutLER §3.1): bipartition the patch graph and pick the foreground side.

    1. W = :func:`affinity_graph`; y = :func:`second_eigenvector`; partition = y > mean(y).
    2. Seed rule: the foreground is the side holding the seed, the patch with the largest |y|.
    3. Object-centric prior: if that side holds more than ``max_corners`` of the grid's 4 corner patches
       (CutLER: at most 2, i.e. flip at 3 or 4), the other side becomes the foreground.
    4. With ``connected``, the foreground is cut down to the 4-connected component (on the grid) of its patch
       farthest from mean(y), as CutLER keeps the seed's component.

    The cut is empty (``foreground`` all False) when y is constant (no bipartition) or the flip leaves nothing.

    Args:
        features: (n, d) features of the n = h·w patches in raster order.
        grid: (h, w) patch grid.
        tau, eps: see :func:`affinity_graph`.
        max_corners: the most grid corners a foreground may hold, 0..4 (4 = never flip).
        connected: keep only the seed's connected component.
    """
    h, w = int(grid[0]), int(grid[1])
    n = torch.as_tensor(features).shape[0]
    if h * w != n:
        raise ValueError(f"`grid` {(h, w)} does not hold the {n} rows of `features`")
    if isinstance(max_corners, bool) or not isinstance(max_corners, int) or not 0 <= max_corners <= 4:
        raise ValueError(f"`max_corners` must be an integer in [0, 4], got {max_corners!r}")
    y, value = second_eigenvector(affinity_graph(features, tau, eps))
    partition = y > y.mean()
    seed = int(np.argmax(np.abs(y)))
    fg = partition.copy() if partition[seed] else ~partition
    corners = fg[[0, w - 1, (h - 1) * w, h * w - 1]]  # (4,) top-left, top-right, bottom-left, bottom-right
    flipped = int(corners.sum()) > max_corners
    if flipped:
        fg = ~fg
    if not partition.any() or partition.all():
        fg = np.zeros(n, dtype=bool)
    if connected and fg.any():
        inside = np.flatnonzero(fg)
        start = inside[np.argmax(np.abs(y[inside] - y.mean()))]
        components, _ = ndimage.label(fg.reshape(h, w))  # default structure: 4-connectivity
        fg = (components == components.reshape(-1)[start]).reshape(-1)
    return NormalizedCut(
        eigenvector=y, eigenvalue=value, partition=partition, seed=seed, flipped=flipped, foreground=fg
    )


def maskcut_masks(
    features: Tensor | np.ndarray,
    grid: tuple[int, int],
    num_masks: int = 3,
    *,
    tau: float = 0.15,
    eps: float = 1e-5,
    max_corners: int = 2,
    connected: bool = True,
    min_area: float = 0.01,
    max_iou: float = 0.5,
) -> MaskCutResult:
    """Up to ``num_masks`` objects by repeated normalized cuts, each on the patches not yet taken (CutLER §3.1).

    Round t runs :func:`normalized_cut` on the features with the rows of every patch already taken set to zero
    (such patches keep only eps edges, as in CutLER). Its mask is the foreground minus the patches already
    taken, so masks are pairwise disjoint. The search stops, keeping the masks found so far, when

    - the foreground minus the taken patches is empty (an empty cut, or one inside the taken region), or
    - from the second round on, the foreground covers at most ``min_area`` of the grid or has IoU above
      ``max_iou`` with the previous round's foreground (CutLER's two filters).

    Args:
        features: (n, d) features of the n = h·w patches in raster order.
        grid: (h, w).
        num_masks: the most masks to return, >= 1 (CutLER: 3).
        tau, eps, max_corners, connected: see :func:`normalized_cut`.
        min_area: fraction of the grid a later foreground must exceed.
        max_iou: largest IoU a later foreground may have with the previous one.
    """
    if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
        raise ValueError(f"`num_masks` must be an integer >= 1, got {num_masks!r}")
    h, w = int(grid[0]), int(grid[1])
    feats = torch.as_tensor(features).detach().to("cpu", torch.float64).clone()  # (n, d)
    taken = np.zeros(h * w, dtype=bool)
    previous: np.ndarray | None = None
    masks: list[np.ndarray] = []
    cuts: list[NormalizedCut] = []
    messages: list[str] = []
    for t in range(num_masks):
        feats[torch.from_numpy(taken)] = 0.0
        cut = normalized_cut(feats, (h, w), tau=tau, eps=eps, max_corners=max_corners, connected=connected)
        cuts.append(cut)
        fg = cut.foreground
        if previous is not None:
            area = fg.mean()
            union = np.logical_or(fg, previous).sum()
            iou = np.logical_and(fg, previous).sum() / union if union else 0.0
            if area <= min_area or iou > max_iou:
                messages.append(
                    f"MaskCut: stopped at round {t + 1}: foreground covers {area:.3f} of the grid "
                    f"(limit > {min_area:g}) with IoU {iou:.3f} to the previous one (limit <= {max_iou:g})"
                )
                break
        new = fg & ~taken
        if not new.any():
            messages.append(f"MaskCut: stopped at round {t + 1}: the cut adds no untaken patch")
            break
        masks.append(new.reshape(h, w))
        taken |= fg
        previous = fg
    stacked = np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)
    return MaskCutResult(masks=stacked, grid=(h, w), cuts=tuple(cuts), messages=tuple(messages))


# ----------------------------------------------------------------------------- DINO adapter
class MaskCut:
    """MaskCut with DINO patch features from a transformers ``ViTModel``.

    The image (any PIL mode, converted to RGB) is resized to ``resolution`` × ``resolution`` (Lanczos, as CutLER),
    scaled to [0, 1] and normalized with ImageNet mean/std; the ViT runs with its position embeddings
    interpolated to that size. The features are the *keys* of the last layer's self-attention (all heads
    concatenated; [CLS] dropped), CutLER's default. Weights load lazily on the first call or :meth:`load`.

        >>> mc = MaskCut("facebook/dino-vits8")
        >>> result = mc(image)           # result.masks: (M, 60, 60) bool, M <= 3
    """

    def __init__(
        self,
        model_id_or_path: str = DEFAULT_MASKCUT_MODEL,
        *,
        device: str | torch.device = "cpu",
        resolution: int = 480,
        tau: float = 0.15,
        num_masks: int = 3,
    ):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ConfigError(f"`resolution` must be a positive integer, got {resolution!r}")
        self.model_id = model_id_or_path
        self.device = torch.device(device)
        self.resolution = resolution
        self.tau = tau
        self.num_masks = num_masks
        self._model: Any = None

    def __repr__(self) -> str:
        return f"MaskCut({self.model_id!r}, resolution={self.resolution}, tau={self.tau}, num_masks={self.num_masks})"

    @property
    def patch_size(self) -> int:
        return int(self.load()._model.config.patch_size)

    def load(self) -> MaskCut:
        """Load the ViT now (idempotent). Raises ModelLoadError (one line) or ConfigError (resolution)."""
        if self._model is None:
            def load(source: str):
                from transformers import ViTModel

                # DINO checkpoints carry no trained pooler.
                return ViTModel.from_pretrained(source, add_pooling_layer=False)

            alternatives = (
                f"pass --maskcut-model a hub id (default {DEFAULT_MASKCUT_MODEL!r}) or a local folder saved with "
                "save_pretrained, or leave out --maskcut"
            )
            model = load_or_fail("MaskCut DINO ViT", str(self.model_id), alternatives, load)
            patch = int(model.config.patch_size)
            if self.resolution % patch:
                raise ConfigError(
                    f"`maskcut_resolution` must be a multiple of the ViT's patch size {patch}, got {self.resolution}"
                )
            self._model = model.to(self.device, torch.float32).eval().requires_grad_(False)
        return self

    def features(self, image: Image.Image) -> tuple[Tensor, tuple[int, int]]:
        """(keys (h·w, d) float32 on CPU, grid (h, w)) of ``image``; h = w = resolution / patch size."""
        self.load()
        r = self.resolution
        rgb = image.convert("RGB").resize((r, r), Image.Resampling.LANCZOS)
        x = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, r, r) in [0, 1]
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        x = ((x - mean) / std)[None].to(self.device)  # (1, 3, r, r)
        captured: dict[str, Tensor] = {}
        handle = _last_key_projection(self._model).register_forward_hook(
            lambda module, args, output: captured.__setitem__("keys", output)
        )
        try:
            with torch.inference_mode():
                self._model(pixel_values=x, interpolate_pos_encoding=True)
        finally:
            handle.remove()
        side = r // self.patch_size
        keys = captured["keys"][0].float().cpu()  # (1 + h·w, d): [CLS] first
        return keys[keys.shape[0] - side * side :], (side, side)

    def __call__(self, image: Image.Image, num_masks: int | None = None) -> MaskCutResult:
        """MaskCut masks of ``image`` on its patch grid; ``num_masks`` overrides the instance's count."""
        feats, grid = self.features(image)
        return maskcut_masks(feats, grid, num_masks or self.num_masks, tau=self.tau)


def _last_key_projection(model) -> torch.nn.Module:
    """The key projection of the last ViT layer (transformers 5: ``layers[-1].attention.k_proj``; 4.x:
    ``encoder.layer[-1].attention.attention.key``)."""
    layers = getattr(model, "layers", None)
    if layers is None and hasattr(model, "encoder"):
        layers = getattr(model.encoder, "layer", None)
    if layers:
        attn = layers[-1].attention
        for path in ("k_proj", "attention.key", "key"):
            module: Any = attn
            for part in path.split("."):
                module = getattr(module, part, None)
            if isinstance(module, torch.nn.Module):
                return module
    raise ConfigError(
        f"MaskCut: cannot find the last layer's key projection in {type(model).__name__}; "
        "it needs a transformers ViTModel"
    )

