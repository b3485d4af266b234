"""Synthetic CLEVR-style scenes with exact instance masks, for tests and smoke runs of the localization benchmark.

A scene is a plain light-grey background (vertical gradient + faint noise) with k non-overlapping flat-shaded
shapes (disc, square, triangle) in distinct CLEVR colours. The picture is painted *from* the label map, so the
masks are exact by construction (no antialiasing: a pixel belongs to one object or to the background).

    >>> image, labels = make_scene(0, size=(128, 96), k=3)   # PIL RGB 128x96, (96, 128) int32 in 0..3
    >>> write_synthetic_dataset("/tmp/scenes", 8, seed=0)    # /tmp/scenes/images/*.png + masks/*.png
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from conceptexpress.errors import OutputError
from conceptexpress.io.atomic import atomic_save_image, ensure_output_dir

__all__ = ["CLEVR_COLORS", "SHAPES", "make_scene", "write_synthetic_dataset"]

# The eight object colours of CLEVR's renderer (properties.json), so scenes look like the paper's test set.
CLEVR_COLORS: tuple[tuple[int, int, int], ...] = (
    (87, 87, 87),  # gray
    (173, 35, 35),  # red
    (42, 75, 215),  # blue
    (29, 105, 20),  # green
    (129, 74, 25),  # brown
    (129, 38, 192),  # purple
    (41, 208, 208),  # cyan
    (255, 238, 51),  # yellow
)
SHAPES = ("disc", "square", "triangle")

_TRIES_PER_OBJECT = 200
_RESTARTS = 20


def make_scene(
    rng: np.random.Generator | int,
    size: tuple[int, int] = (128, 128),
    k: int = 3,
    *,
    radius: tuple[float, float] = (0.12, 0.2),
    margin: int = 2,
) -> tuple[Image.Image, np.ndarray]:
    """Draw one scene with ``k`` objects.

    Args:
        rng: a numpy Generator or an int seed (same seed, same scene).
        size: ``(W, H)`` in pixels.
        k: number of objects, 1..8 (one distinct CLEVR colour each).
        radius: (min, max) circumradius of a shape as a fraction of the shorter side (at least 3 px); shrunk
            by up to ~80% (not below 3 px, so every shape keeps pixels) when k shapes of that size do not fit.
        margin: minimum gap in pixels between two shapes and between a shape and the image border.

    Returns:
        ``(image, labels)``: PIL RGB image of size ``(W, H)``; (H, W) int32 instance map, 0 = background and
        1..k the objects in the order they were placed. Every object has at least one pixel.

    Raises:
        ValueError: bad arguments, or k shapes of that size do not fit in the image.
    """
    rng = np.random.default_rng(rng)
    width, height = int(size[0]), int(size[1])
    if not 1 <= k <= len(CLEVR_COLORS):
        raise ValueError(f"`k` must be in 1..{len(CLEVR_COLORS)} (one distinct colour per object), got {k}")
    if not 0 < radius[0] <= radius[1] < 0.5:
        raise ValueError(f"`radius` must be (min, max) with 0 < min <= max < 0.5, got {radius}")
    if min(width, height) < 16:
        raise ValueError(f"`size` must be at least 16x16 pixels, got {size}")

    side = min(width, height)
    r_lo, r_hi = max(3.0, radius[0] * side), max(3.0, radius[1] * side)
    for attempt in range(_RESTARTS):
        # Crowded scenes (many objects, small image) shrink the shapes a little per failed attempt.
        shrink = 0.92**attempt
        placed = _place(rng, width, height, k, max(3.0, r_lo * shrink), max(3.0, r_hi * shrink), margin)
        if placed is not None:
            break
    else:
        raise ValueError(
            f"cannot place {k} shapes of radius {r_lo:.0f}-{r_hi:.0f} px in a {width}x{height} image"
        )

    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5  # pixel centres
    labels = np.zeros((height, width), dtype=np.int32)
    shapes = rng.choice(len(SHAPES), size=k)
    for i, ((cx, cy, r), s) in enumerate(zip(placed, shapes), start=1):
        inside = _inside(SHAPES[s], xs - cx, ys - cy, r, rng.uniform(0, 2 * math.pi))
        labels[inside] = i
    return _paint(rng, labels, rng.choice(len(CLEVR_COLORS), size=k, replace=False)), labels


def write_synthetic_dataset(
    folder: str | Path,
    n_images: int,
    seed: int = 0,
    *,
    size: tuple[int, int] = (128, 128),
    objects: int | tuple[int, int] = (2, 4),
    overwrite: bool = False,
) -> Path:
    """Write ``n_images`` scenes in the benchmark's dataset layout and return ``folder``.

    Layout: ``folder/images/scene_0000.png`` (RGB) and ``folder/masks/scene_0000.png`` (8-bit label map,
    0 = background, 1..k objects); see ``docs/localization-benchmark.md``. Scene i is drawn from the seed
    ``(seed, i)``, so a larger dataset starts with the same scenes as a smaller one.

    Args:
        objects: number of objects per scene, an int or an inclusive (min, max) range drawn uniformly.
        overwrite: allow writing into a folder whose ``images/`` already holds files.

    Raises:
        OutputError: ``folder/images`` already holds files and ``overwrite`` is False, or it cannot be written.
        ValueError: ``n_images`` < 1 or a bad ``objects`` range.
    """
    if isinstance(n_images, bool) or not isinstance(n_images, int) or n_images < 1:
        raise ValueError(f"`n_images` must be an integer >= 1, got {n_images!r}")
    lo, hi = (objects, objects) if isinstance(objects, int) else (int(objects[0]), int(objects[1]))
    if not 1 <= lo <= hi <= len(CLEVR_COLORS):
        raise ValueError(f"`objects` must be in 1..{len(CLEVR_COLORS)} with min <= max, got {objects}")
    folder = Path(folder)
    images_dir = folder / "images"
    if images_dir.is_dir() and any(images_dir.iterdir()) and not overwrite:
        raise OutputError(
            f"'{images_dir}' already holds files; choose an empty dataset folder (or pass overwrite=True)"
        )
    ensure_output_dir(images_dir)
    ensure_output_dir(folder / "masks")
    for i in range(n_images):
        rng = np.random.default_rng([seed, i])
        image, labels = make_scene(rng, size=size, k=int(rng.integers(lo, hi + 1)))
        name = f"scene_{i:04d}.png"
        atomic_save_image(image, images_dir / name)
        atomic_save_image(Image.fromarray(labels.astype(np.uint8), mode="L"), folder / "masks" / name)
    return folder


def _place(
    rng: np.random.Generator, width: int, height: int, k: int, r_lo: float, r_hi: float, margin: int
) -> list[tuple[float, float, float]] | None:
    """k (cx, cy, r) circles inside the image, pairwise separated by ``margin``; None if rejection sampling fails."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(k):
        for _ in range(_TRIES_PER_OBJECT):
            r = rng.uniform(r_lo, r_hi)
            lo_x, hi_x, lo_y, hi_y = r + margin, width - r - margin, r + margin, height - r - margin
            if lo_x >= hi_x or lo_y >= hi_y:
                continue
            cx, cy = rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)
            if all(math.hypot(cx - x, cy - y) > r + q + margin for x, y, q in placed):
                placed.append((cx, cy, r))
                break
        else:
            return None
    return placed


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, r: float, angle: float) -> np.ndarray:
    """(H, W) bool: pixel offsets (dx, dy) from the centre inside ``shape`` of circumradius r rotated by angle."""
    if shape == "disc":
        return dx**2 + dy**2 <= r**2
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    if shape == "square":
        half = r / math.sqrt(2.0)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    # Equilateral triangle: inside the three half-planes whose edges lie at distance r/2 from the centre.
    inside = np.ones_like(dx, dtype=bool)
    for t in (0.0, 2 * math.pi / 3, 4 * math.pi / 3):
        inside &= u * math.cos(t) + v * math.sin(t) <= r / 2
    return inside


def _paint(rng: np.random.Generator, labels: np.ndarray, colour_ids: np.ndarray) -> Image.Image:
    """RGB picture of ``labels``: grey gradient background, each object its colour with a soft top-left light."""
    height, width = labels.shape
    base = rng.uniform(185, 215)
    ramp = np.linspace(base + 15, base - 15, height)[:, None, None]  # lighter at the top, like a lit floor
    img = np.broadcast_to(ramp, (height, width, 3)).astype(np.float64).copy()
    ys, xs = np.mgrid[0:height, 0:width]
    for i, cid in enumerate(colour_ids, start=1):
        m = labels == i
        colour = np.asarray(CLEVR_COLORS[cid], dtype=np.float64)
        y0, x0 = ys[m].min(), xs[m].min()
        extent = max(1, max(ys[m].max() - y0, xs[m].max() - x0))
        light = 1.15 - 0.3 * ((ys[m] - y0) + (xs[m] - x0)) / (2 * extent)  # 1.15 .. 0.85
        img[m] = colour[None, :] * light[:, None]
    img += rng.normal(0.0, 2.0, size=img.shape)  # faint sensor-like noise
    return Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")
