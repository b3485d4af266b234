"""The measuring instrument of the toy world: read the coloured shapes in a picture.

Colour by hue (saturated pixels only: the background is grey), shape by geometry: each connected component is
compared with an ideal circle, square and triangle of the same area and centroid (squares and triangles at every
rotation in 3° steps); the shape whose best template overlaps it most (IoU) wins. Template matching tolerates
the soft, rounded corners of generated pictures, where simple fill ratios mistake triangles for squares.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from .world import shape_mask

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


# Circumradius of a shape of unit area, and the rotations that matter (symmetry period).
_UNIT_RADIUS = {"circle": 1 / np.sqrt(np.pi), "square": 1 / np.sqrt(2.0), "triangle": np.sqrt(4 / (3 * np.sqrt(3)))}
_PERIOD = {"circle": 0.0, "square": np.pi / 2, "triangle": 2 * np.pi / 3}


def _shape(component: np.ndarray) -> str:
    ys, xs = np.nonzero(component)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5  # pixel centres
    # A window around the component keeps the template comparison cheap on large pictures.
    pad = int(np.sqrt(len(ys))) + 2
    y0, x0 = max(0, int(cy) - 2 * pad), max(0, int(cx) - 2 * pad)
    crop = component[y0 : int(cy) + 2 * pad, x0 : int(cx) + 2 * pad]
    best, best_iou = "circle", -1.0
    for shape, unit_r in _UNIT_RADIUS.items():
        r = unit_r * np.sqrt(len(ys))
        steps = max(1, int(round(np.degrees(_PERIOD[shape]) / 3)))
        for angle in np.linspace(0.0, _PERIOD[shape], steps, endpoint=False):
            t = shape_mask(shape, cx - x0, cy - y0, r, float(angle), crop.shape)
            iou = (t & crop).sum() / max(1, (t | crop).sum())
            if iou > best_iou:
                best, best_iou = shape, iou
    return best


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
