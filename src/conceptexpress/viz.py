"""Pictures of localization results, with PIL and numpy only (no matplotlib).

- :func:`overlay_concepts`: the final concepts as numbered translucent regions over the photo (paper Fig. 3 left),
  drawn at least :data:`OVERLAY_MIN_LONG_SIDE` px on the long side so its numbers stay legible on small photos.
- :func:`label_map_image`: any latent-size label map as a colour picture, optionally over the photo.
- :func:`stages_figure`: the three stages of §3.2 side by side: pre-clustering, filtering, post-clustering.

Colours are deterministic: concept ``k`` has the same colour in every picture of a run.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from conceptexpress.io.images import to_rgb, upsample_masks

# First ten colours: a hand-picked qualitative palette that stays distinct on photos; more are generated.
_BASE_PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (0, 130, 200),  # blue
    (255, 225, 25),  # yellow
    (145, 30, 180),  # purple
    (245, 130, 48),  # orange
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (128, 128, 0),  # olive
    (0, 128, 128),  # teal
)
_GOLDEN = 0.618033988749895
_PANEL_HEIGHT = 256
_PANEL_MAX_WIDTH = 1024  # a panorama shrinks its panels rather than making a figure 8000 px wide
_GAP = 6
_DROPPED_GREY = (150, 150, 150)
# A 64-px photo drawn at its own size gives numbers a few pixels high: small photos are drawn enlarged up to this.
OVERLAY_MIN_LONG_SIDE = 512


def concept_colors(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct, deterministic RGB colours (uint8 triples); the first ten are a fixed palette.

    Beyond ten, hues follow the golden-ratio sequence with saturation and value cycling, skipping any colour
    already used, so every prefix of the list is the same for any ``n``.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    colors: list[tuple[int, int, int]] = list(_BASE_PALETTE[:n])
    seen = set(colors)
    i = 0
    while len(colors) < n:
        hue = (0.11 + i * _GOLDEN) % 1.0
        sat = (0.95, 0.6, 0.8)[i % 3]
        val = (0.95, 0.75, 0.55)[(i // 3) % 3]
        r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
        c = (round(r * 255), round(g * 255), round(b * 255))
        if c not in seen:
            seen.add(c)
            colors.append(c)
        i += 1
    return colors


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled default font at ``size`` px (falls back to the fixed bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):
        return ImageFont.load_default()


def _draw_centered(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, stroke: int) -> None:
    """White text with a black outline, centred on ``xy`` (works for FreeType and bitmap fonts)."""
    try:
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    except (TypeError, ValueError):
        stroke = 0
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    x = xy[0] - (left + right) / 2
    y = xy[1] - (top + bottom) / 2
    try:
        draw.text((x, y), text, font=font, fill=(255, 255, 255), stroke_width=stroke, stroke_fill=(0, 0, 0))
    except (TypeError, ValueError):
        draw.text((x, y), text, font=font, fill=(255, 255, 255))


def _interior_point(mask: np.ndarray) -> tuple[int, int] | None:
    """(x, y) of the pixel farthest from the mask's border (image edges count as border); None if empty."""
    if not mask.any():
        return None
    # Pad with background so a region touching the image edge is not treated as extending beyond it.
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    # Elongated regions have a whole ridge of maxima; take the ridge pixel nearest the region's centroid so
    # the number sits in the middle of a rectangle rather than at the first maximum in raster order.
    ys, xs = np.nonzero(dist >= dist.max() - 0.5)
    cy, cx = np.argwhere(mask).mean(axis=0)
    i = int(np.argmin((ys - cy) ** 2 + (xs - cx) ** 2))
    return int(xs[i]), int(ys[i])


def overlay_scale(size_wh: tuple[int, int], min_long_side: int = OVERLAY_MIN_LONG_SIDE) -> int:
    """The integer factor an overlay of a ``(W, H)`` photo is drawn at: the smallest ``s >= 1`` with
    ``s * max(W, H) >= min_long_side`` (1 for photos at least that large, 8 for a 64-px photo at 512)."""
    long_side = max(1, *size_wh)
    return max(1, -(-int(min_long_side) // long_side))


def overlay_concepts(
    image: Image.Image, masks: np.ndarray, alpha: float = 0.5, min_long_side: int = OVERLAY_MIN_LONG_SIDE
) -> Image.Image:
    """Draw each concept as a translucent coloured region with its outline and 1-based number.

    Args:
        image: the photo, any mode (normalized to RGB), size ``(W, H)``.
        masks: (N, H, W) bool at the photo's size (use :func:`conceptexpress.io.upsample_masks` first).
        alpha: opacity of the fill in [0, 1].
        min_long_side: a smaller photo is drawn enlarged by the integer factor :func:`overlay_scale` (photo
            bicubic, masks by pixel repetition, so each region stays exactly its mask), with outline and number
            sized for the enlarged picture; 0 draws at the photo's size.

    Returns:
        RGB image of size ``(s·W, s·H)``, ``s = overlay_scale((W, H), min_long_side)``: ``(W, H)`` for photos
        with a long side ≥ ``min_long_side``. The number sits at the region's most interior point (maximum of
        the distance transform), so it lands inside even non-convex regions; colours are ``concept_colors(N)``.
    """
    rgb = to_rgb(image) if image.mode != "RGB" else image
    masks = np.asarray(masks).astype(bool, copy=False)
    w, h = rgb.size
    if masks.ndim != 3 or masks.shape[1:] != (h, w):
        raise ValueError(f"masks must have shape (N, {h}, {w}) to match the image, got {masks.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    scale = overlay_scale((w, h), min_long_side)
    if scale > 1:
        w, h = w * scale, h * scale
        rgb = rgb.resize((w, h), Image.Resampling.BICUBIC)
        masks = masks.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, s·H, s·W): nearest, exact
    n = masks.shape[0]
    colors = concept_colors(n)

    out = np.asarray(rgb, dtype=np.float32).copy()  # (H, W, 3) in [0, 255]
    thickness = max(1, round(min(w, h) / 150))
    outline = np.zeros((n, h, w), dtype=bool)
    for k in range(n):
        m = masks[k]
        color = np.asarray(colors[k], dtype=np.float32)
        out[m] = (1.0 - alpha) * out[m] + alpha * color
        inner = ndimage.binary_erosion(m, iterations=thickness, border_value=0)
        outline[k] = m & ~inner
    for k in range(n):
        out[outline[k]] = colors[k]
    result = Image.fromarray(np.rint(out).clip(0, 255).astype(np.uint8), mode="RGB")

    draw = ImageDraw.Draw(result)
    font = _font(max(12, min(w, h) // 12))
    stroke = max(1, min(w, h) // 200)
    for k in range(n):
        point = _interior_point(masks[k])
        if point is not None:
            _draw_centered(draw, point, str(k + 1), font, stroke)
    return result


def _label_colors(labels: np.ndarray, n: int | None = None) -> np.ndarray:
    """(h, w, 3) uint8 picture of a label map; -1 (and any negative) is black."""
    n = int(labels.max()) + 1 if n is None else n
    lut = np.zeros((max(n, 0) + 1, 3), dtype=np.uint8)  # last row: "none"
    if n > 0:
        lut[:n] = np.asarray(concept_colors(n), dtype=np.uint8)
    idx = np.where(labels >= 0, labels, n)
    return lut[idx]


def label_map_image(
    labels: np.ndarray,
    image: Image.Image | None = None,
    size_wh: tuple[int, int] | None = None,
    alpha: float = 0.6,
) -> Image.Image:
    """Colour picture of a label map, label ``k`` in ``concept_colors(K)[k]``.

    Args:
        labels: (h, w) int, values in [0, K) or -1 for "no label".
        image: optional photo to draw over; labelled pixels blend their colour with opacity ``alpha``,
            unlabelled ones show the photo unchanged. Without it, unlabelled pixels are black.
        size_wh: output size ``(W, H)``; defaults to the photo's size, else the label map's ``(w, h)``.
            Labels are resized with nearest neighbour so the latent grid stays visible.

    Returns:
        RGB image of size ``size_wh``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must have shape (h, w), got {labels.shape}")
    labels = labels.astype(np.int64)
    if size_wh is None:
        size_wh = image.size if image is not None else (labels.shape[1], labels.shape[0])
    size = (int(size_wh[0]), int(size_wh[1]))
    colour = Image.fromarray(_label_colors(labels), mode="RGB").resize(size, Image.Resampling.NEAREST)
    if image is None:
        return colour
    has_label = Image.fromarray(((labels >= 0) * 255).astype(np.uint8), mode="L")
    has_label = has_label.resize(size, Image.Resampling.NEAREST)
    photo = to_rgb(image).resize(size, Image.Resampling.BICUBIC)
    blended = Image.blend(photo, colour, alpha)
    return Image.composite(blended, photo, has_label)


def _panel_size(size_wh: tuple[int, int]) -> tuple[int, int]:
    w, h = size_wh
    pw, ph = round(_PANEL_HEIGHT * w / h), _PANEL_HEIGHT
    if pw > _PANEL_MAX_WIDTH:
        pw, ph = _PANEL_MAX_WIDTH, round(_PANEL_MAX_WIDTH * h / w)
    return max(1, pw), max(1, ph)


def stages_figure(
    image: Image.Image,
    pre_labels: np.ndarray,
    kept: np.ndarray,
    post_labels: np.ndarray,
    titles: Sequence[str] = ("1 pre-clustering", "2 filtering", "3 post-clustering"),
) -> Image.Image:
    """Three panels side by side showing the localization stages of paper §3.2.

    Args:
        image: the photo, any mode, size ``(W, H)``.
        pre_labels: (h, w) int, pre-cluster index per latent pixel in [0, N'), -1 allowed for none.
        kept: (N',) bool, which pre-clusters passed the [EOT] filter (Eq. 5).
        post_labels: (h, w) int, final concept index in [0, N) or -1 for background.
        titles: three captions, drawn above the panels with Pillow's default font.

    Returns:
        RGB figure: panel 1 colours every pre-cluster; panel 2 keeps the kept clusters' colours (same as
        panel 1) and greys the dropped ones; panel 3 shows the final concepts numbered, as
        :func:`overlay_concepts`. Each panel is 256 px high at the photo's aspect ratio (panels of very wide
        photos are capped at 1024 px wide), with a title strip above.
    """
    pre = np.asarray(pre_labels).astype(np.int64)
    post = np.asarray(post_labels).astype(np.int64)
    kept = np.asarray(kept).astype(bool).reshape(-1)
    if pre.ndim != 2 or post.ndim != 2:
        raise ValueError(f"pre_labels and post_labels must be (h, w), got {pre.shape} and {post.shape}")
    n_pre = int(pre.max()) + 1 if pre.size else 0
    if kept.shape[0] < n_pre:
        raise ValueError(f"kept has {kept.shape[0]} entries but pre_labels has {n_pre} clusters")
    if len(titles) != 3:
        raise ValueError(f"titles must hold 3 strings, got {len(titles)}")

    photo = to_rgb(image)
    size = _panel_size(photo.size)
    small = photo.resize(size, Image.Resampling.BICUBIC)

    # 1. Every pre-cluster in its own colour.
    panel1 = label_map_image(pre, small)

    # 2. Same colours for kept clusters; dropped ones greyed so the eye reads "removed".
    colours = _label_colors(pre, n=max(n_pre, kept.shape[0]))
    dropped = (pre >= 0) & ~kept[np.clip(pre, 0, None)]
    colours[dropped] = _DROPPED_GREY
    colour_img = Image.fromarray(colours, mode="RGB").resize(size, Image.Resampling.NEAREST)
    labelled = Image.fromarray(((pre >= 0) * 255).astype(np.uint8), mode="L").resize(
        size, Image.Resampling.NEAREST
    )
    faded = Image.blend(small, Image.new("RGB", size, (255, 255, 255)), 0.5)  # grey-out the photo too
    panel2 = Image.composite(Image.blend(faded, colour_img, 0.6), faded, labelled)

    # 3. Final concepts, smooth edges, numbered.
    n_post = int(post.max()) + 1 if post.size else 0
    masks = post[None] == np.arange(max(n_post, 0))[:, None, None]  # (N, h, w) bool
    panel3 = overlay_concepts(small, upsample_masks(masks, size), min_long_side=0)  # the panel's size

    # Assemble with a title strip; a slot is widened for a title longer than a narrow (portrait) panel.
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    boxes = [probe.textbbox((0, 0), t, font=font) for t in titles]
    title_h = max(b[3] - b[1] for b in boxes) + 2 * _GAP
    slot_w = max(size[0], *(b[2] - b[0] + 2 * _GAP for b in boxes))
    fig = Image.new("RGB", (3 * slot_w + 4 * _GAP, title_h + size[1] + _GAP), (255, 255, 255))
    draw = ImageDraw.Draw(fig)
    for i, (panel, title, box) in enumerate(zip((panel1, panel2, panel3), titles, boxes)):
        x0 = _GAP + i * (slot_w + _GAP)
        fig.paste(panel, (x0 + (slot_w - size[0]) // 2, title_h))
        tx = x0 + (slot_w - (box[2] - box[0])) / 2 - box[0]
        draw.text((tx, _GAP - box[1]), title, font=font, fill=(0, 0, 0))
    return fig
