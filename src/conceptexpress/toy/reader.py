"""The measuring instrument of the toy world: read the coloured shapes in a picture.

Colour by hue (saturated pixels only: the background is grey), shape by geometry: the fill ratio
``area / (π · r_max²)`` of a connected component, with ``r_max`` the largest distance of its pixels from its
centroid, is ~1 for a circle, 2/π ≈ 0.64 for a square and 3√3/(4π) ≈ 0.41 for a triangle, whatever the rotation.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

__all__ = ["read_objects", "read_components"]

# Hue ranges in degrees of the toy palette (red 0°, yellow ~50°, green ~130°, blue ~225°).
_HUES = (("red", 0, 22), ("yellow", 22, 85), ("green", 85, 185), ("blue", 185, 290), ("red", 290, 361))
_MIN_SATURATION = 0.35
_MIN_VALUE = 0.25
_MIN_AREA_FRACTION = 0.004  # components smaller than 0.4 % of the picture (16 px at 64²) are noise


def _hue_saturation_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    delta = mx - mn
    safe = np.where(delta > 0, delta, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4)) * 60.0
    sat = np.where(mx > 0, delta / np.where(mx > 0, mx, 1.0), 0.0)
    return hue, sat, mx


def _shape(component: np.ndarray) -> str:
    ys, xs = np.nonzero(component)
    cy, cx = ys.mean(), xs.mean()
    r_max = np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2).max() + 0.5
    fill = len(ys) / (np.pi * r_max**2)
    if fill > 0.8:
        return "circle"
    return "square" if fill > 0.52 else "triangle"


def read_components(image: Image.Image) -> list[tuple[str, str, np.ndarray]]:
    """``(colour, shape, mask)`` for every coloured component, left to right by centroid."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0  # (H, W, 3) in [0, 1]
    hue, sat, val = _hue_saturation_value(rgb)
    coloured = (sat > _MIN_SATURATION) & (val > _MIN_VALUE)
    min_area = max(4, int(_MIN_AREA_FRACTION * coloured.size))
    found = []
    for name in dict.fromkeys(n for n, _, _ in _HUES):
        in_range = np.zeros_like(coloured)
        for n, lo, hi in _HUES:
            if n == name:
                in_range |= (hue >= lo) & (hue < hi)
        labels, count = ndimage.label(coloured & in_range)
        for i in range(1, count + 1):
            comp = labels == i
            if comp.sum() >= min_area:
                found.append((name, _shape(comp), comp))
    found.sort(key=lambda f: np.nonzero(f[2])[1].mean())
    return found


def read_objects(image: Image.Image) -> list[tuple[str, str]]:
    """The ``(colour, shape)`` objects seen in ``image`` (any size/mode), left to right."""
    return [(c, s) for c, s, _ in read_components(image)]
