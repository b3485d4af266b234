"""The toy world: procedural scenes with known objects, masks and captions (docs/toy-world.md).

A scene is a light-grey background (a faint vertical gradient and sensor-like noise: not an object) with 1–4
non-overlapping flat shapes, each of a different colour (squares axis-aligned and triangles apex-up since run10;
``upright=False`` rotates them at random, the world of runs 1–9). Everything is exact by construction: the picture is
painted from the instance masks, and the caption names the objects.

    >>> scene = render_scene(3)
    >>> scene.caption
    'a photo of a red circle and a blue triangle'
    >>> scene.image.size, scene.masks.shape          # ((64, 64), (K, 64, 64))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "COLORS",
    "IMAGE_SIZE",
    "SHAPES",
    "ToyScene",
    "caption_for",
    "caption_objects",
    "render_scene",
    "scene_layout",
]

IMAGE_SIZE = 64  # px, square; the toy model's native resolution
# Saturated, well separated hues so that `read_objects` can tell them apart on generated images too.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 60),
    "blue": (45, 85, 220),
    "yellow": (235, 205, 35),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Object-count distribution: single-object scenes are common (captions of one object teach the vocabulary).
_COUNT_PROBS = (0.3, 0.25, 0.25, 0.2)
# Circumradius range in px by object count (more objects, smaller shapes), and the gap between shapes.
_RADIUS = {1: (11.0, 17.0), 2: (9.0, 14.0), 3: (8.5, 12.0), 4: (8.0, 11.0)}
_GAP = 4.0


@dataclass(frozen=True)
class ToyScene:
    """One rendered scene.

    ``image``: PIL RGB, ``IMAGE_SIZE`` square. ``masks``: (K, H, W) bool instance masks, disjoint, in the order
    of ``objects``. ``objects``: K ``(colour, shape)`` pairs. ``caption``: ``"a photo of a red circle and …"``
    naming the objects in a seeded random order.
    """

    image: Image.Image
    masks: np.ndarray
    objects: list[tuple[str, str]]
    caption: str
    seed: int


def caption_for(objects: list[tuple[str, str]]) -> str:
    """``"a photo of a red circle and a blue square"`` for the objects in the given order."""
    if not objects:
        raise ValueError("a caption needs at least one object")
    return "a photo of " + " and ".join(f"a {c} {s}" for c, s in objects)


def caption_objects(caption: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs of a caption ``caption_for`` wrote, in the caption's order (its inverse)."""
    return [tuple(part.split()[1:3]) for part in caption.removeprefix("a photo of ").split(" and ")]


# Angle (radians, `shape_mask`'s convention) that puts a shape upright: a square's sides along the axes, a
# triangle's apex up (its base's outward normal points down the image).
UPRIGHT_ANGLE = {"circle": 0.0, "square": 0.0, "triangle": math.pi / 2}


def scene_layout(seed: int, num_objects: int | None = None, upright: bool = True
                 ) -> list[tuple[str, str, float, float, float, float]]:
    """The objects of scene ``seed``: ``(colour, shape, cx, cy, r, angle)`` in pixels/radians.

    ``upright``: squares axis-aligned and triangles apex-up instead of rotated at random (every other draw —
    count, colours, places, sizes, shapes — is the same as the rotated scene's)."""
    rng = np.random.default_rng([0x70F, int(seed)])
    k = int(rng.choice(4, p=_COUNT_PROBS)) + 1 if num_objects is None else int(num_objects)
    if not 1 <= k <= len(COLORS):
        raise ValueError(f"`num_objects` must be in 1..{len(COLORS)}, got {num_objects!r}")
    colours = [list(COLORS)[i] for i in rng.permutation(len(COLORS))[:k]]  # distinct colours per scene
    lo, hi = _RADIUS[k]
    for _attempt in range(100):
        placed: list[tuple[float, float, float]] = []
        for _ in range(k):
            for _try in range(200):
                r = rng.uniform(lo, hi)
                cx, cy = rng.uniform(r + 2, IMAGE_SIZE - r - 2, size=2)
                if all(math.hypot(cx - x, cy - y) > r + q + _GAP for x, y, q in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break
        if len(placed) == k:
            break
        lo, hi = lo * 0.95, hi * 0.95
    else:  # pragma: no cover - the radii above always fit 4 shapes
        raise RuntimeError(f"could not place {k} objects for seed {seed}")
    shapes = [SHAPES[i] for i in rng.integers(0, len(SHAPES), size=k)]
    angles = rng.uniform(0, 2 * math.pi, size=k)
    if upright:
        angles = [UPRIGHT_ANGLE[s] for s in shapes]
    return [(c, s, x, y, r, float(a)) for c, s, (x, y, r), a in zip(colours, shapes, placed, angles)]


def shape_mask(
    shape: str, cx: float, cy: float, r: float, angle: float, size: int | tuple[int, int] = IMAGE_SIZE
) -> np.ndarray:
    """(H, W) bool: pixel centres inside ``shape`` of circumradius ``r`` centred at (cx, cy), rotated.

    ``size``: an int for a square picture or ``(H, W)``.
    """
    h, w = (size, size) if isinstance(size, int) else size
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    c, s = math.cos(angle), math.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if shape == "square":
        half = r / math.sqrt(2.0)
        return (np.abs(u) <= half) & (np.abs(v) <= half)
    if shape == "triangle":
        inside = np.ones_like(dx, dtype=bool)
        for t in (0.0, 2 * math.pi / 3, 4 * math.pi / 3):
            inside &= u * math.cos(t) + v * math.sin(t) <= r / 2
        return inside
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_scene(seed: int, num_objects: int | None = None, upright: bool = True) -> ToyScene:
    """Render scene ``seed`` (deterministic) with ``num_objects`` objects (None: 1–4 drawn from the seed);
    ``upright``: squares and triangles unrotated (`scene_layout`)."""
    layout = scene_layout(seed, num_objects, upright)
    rng = np.random.default_rng([0x70E, int(seed)])
    base = rng.uniform(190, 225)
    ramp = np.linspace(base + 8, base - 8, IMAGE_SIZE)[:, None, None]
    img = np.broadcast_to(ramp, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float64).copy()
    masks = np.zeros((len(layout), IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for i, (colour, shape, cx, cy, r, angle) in enumerate(layout):
        masks[i] = shape_mask(shape, cx, cy, r, angle)
        tint = np.asarray(COLORS[colour], dtype=np.float64) * rng.uniform(0.9, 1.05)
        img[masks[i]] = tint
    img += rng.normal(0.0, 2.0, size=img.shape)
    image = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), mode="RGB")
    objects = [(c, s) for c, s, *_ in layout]
    order = rng.permutation(len(objects))
    return ToyScene(image, masks, objects, caption_for([objects[i] for i in order]), int(seed))
