"""Pictures: expected sizes, one distinct colour per concept, numbers drawn inside regions, greyed dropped clusters."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conceptexpress.viz import (
    OVERLAY_MIN_LONG_SIDE,
    concept_colors,
    label_map_image,
    overlay_concepts,
    overlay_scale,
    stages_figure,
)

GREY = (128, 128, 128)


def _two_masks(h: int = 120, w: int = 160) -> np.ndarray:
    masks = np.zeros((2, h, w), dtype=bool)  # (2, H, W) bool
    masks[0, 10:110, 10:70] = True
    masks[1, 30:90, 90:150] = True
    return masks


def test_concept_colors_distinct_and_deterministic():
    for n in (0, 1, 10, 11, 64):
        colors = concept_colors(n)
        assert len(colors) == n == len(set(colors))
        assert all(len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c) for c in colors)
    assert concept_colors(64) == concept_colors(64)
    assert concept_colors(64)[:12] == concept_colors(12)  # a concept keeps its colour whatever N is


def test_overlay_size_and_colours_differ_per_concept():
    img = Image.new("RGB", (160, 120), GREY)
    masks = _two_masks()
    out = overlay_concepts(img, masks, alpha=0.5, min_long_side=0)  # at the photo's size: pixels checked below
    assert out.mode == "RGB" and out.size == (160, 120)
    arr = np.asarray(out).astype(int)
    colors = np.asarray(concept_colors(2))
    # Sample away from outline and number: pure fill = mix of grey and the concept's colour.
    fill0, fill1 = arr[20, 20], arr[40, 95]
    np.testing.assert_allclose(fill0, (np.array(GREY) + colors[0]) / 2, atol=1)
    np.testing.assert_allclose(fill1, (np.array(GREY) + colors[1]) / 2, atol=1)
    assert not np.array_equal(fill0, fill1)
    assert (arr[5, 80] == GREY).all()  # outside every mask: untouched
    assert (arr[10, 40] == colors[0]).all()  # outline in full colour


def test_overlay_numbers_at_interior_point():
    img = Image.new("RGB", (160, 120), GREY)
    out = np.asarray(overlay_concepts(img, _two_masks(), min_long_side=0))
    # Mask 0's most interior point is near (x=40, y=60): the white number with black stroke is drawn there.
    patch = out[45:75, 28:52].astype(int)  # antialiased glyph: look for near-white fill and near-black stroke
    assert (patch > 230).all(axis=-1).any() and (patch < 25).all(axis=-1).any()
    patch1 = out[45:75, 108:132].astype(int)  # mask 1's number sits at its centre (x=120, y=60)
    assert (patch1 > 230).all(axis=-1).any()


def test_overlay_empty_mask_and_shape_mismatch():
    img = Image.new("L", (40, 30), 100)  # non-RGB photo is normalized
    masks = np.zeros((1, 30, 40), dtype=bool)
    assert np.array_equal(np.asarray(overlay_concepts(img, masks, min_long_side=0))[..., 0], np.full((30, 40), 100))
    with pytest.raises(ValueError, match="30, 40"):
        overlay_concepts(img, np.zeros((1, 8, 8), dtype=bool))


@pytest.mark.parametrize(("size", "expected"), [((64, 64), (512, 512)), ((160, 120), (640, 480)),
                                               ((100, 30), (600, 180)), ((600, 400), (600, 400)),
                                               ((512, 64), (512, 64)), ((2000, 1500), (2000, 1500))])
def test_overlay_is_drawn_at_least_512_px_on_the_long_side(size, expected):
    """Issue 26: the overlay of a 64-px photo was 64 px and its numbers could not be read. A smaller photo is drawn
    enlarged by an integer factor (long side >= 512), a photo at least that large at its own size."""
    assert OVERLAY_MIN_LONG_SIDE == 512
    out = overlay_concepts(Image.new("RGB", size, GREY), np.zeros((1, size[1], size[0]), dtype=bool))
    assert out.size == expected and max(out.size) >= 512
    assert overlay_scale(size) == expected[0] // size[0]


def test_a_64_px_overlay_keeps_one_exact_region_per_concept_and_legible_numbers():
    img = Image.new("RGB", (64, 64), GREY)
    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[0, 4:40, 4:28] = True
    masks[1, 20:60, 36:60] = True
    out = np.asarray(overlay_concepts(img, masks)).astype(int)  # (512, 512, 3): each photo pixel is 8×8
    assert out.shape == (512, 512, 3)
    colors = np.asarray(concept_colors(2))
    np.testing.assert_allclose(out[4 * 8 + 12, 4 * 8 + 12], (np.array(GREY) + colors[0]) / 2, atol=1)
    np.testing.assert_allclose(out[59 * 8 - 12, 59 * 8 - 12], (np.array(GREY) + colors[1]) / 2, atol=1)
    assert (out[2 * 8, 2 * 8] == GREY).all() and (out[63 * 8, 30 * 8] == GREY).all()  # outside: untouched
    # the number "1" at mask 0's interior point (x≈16, y≈22 in photo pixels): white glyph pixels, tens of px high
    glyph = (out[:, :, :] > 230).all(axis=-1) & masks[0].repeat(8, 0).repeat(8, 1)
    ys = np.nonzero(glyph.any(axis=1))[0]
    assert ys.size and ys.max() - ys.min() >= 20, ys


def test_label_map_image_sizes_and_background():
    labels = np.full((4, 6), -1)
    labels[:2, :3], labels[2:, 3:] = 0, 1
    pic = label_map_image(labels)
    assert pic.size == (6, 4)
    arr = np.asarray(pic)
    assert tuple(arr[0, 0]) == concept_colors(2)[0] and tuple(arr[3, 5]) == concept_colors(2)[1]
    assert (arr[3, 0] == 0).all()  # -1 is black without a photo
    assert label_map_image(labels, size_wh=(60, 40)).size == (60, 40)
    photo = Image.new("RGB", (120, 80), GREY)
    over = np.asarray(label_map_image(labels, image=photo))
    assert over.shape == (80, 120, 3)
    assert (over[70, 5] == GREY).all()  # unlabelled pixels show the photo
    assert not (over[5, 5] == GREY).all()


def _stage_inputs():
    pre = np.repeat(np.arange(4), 4)[None].repeat(8, axis=0).reshape(8, 16)  # (8, 16): 4 vertical stripes
    kept = np.array([True, False, True, True])
    post = np.full((8, 16), -1)
    post[:, 0:4], post[:, 8:16] = 0, 1
    return pre, kept, post


def test_stages_figure_layout():
    photo = Image.new("RGB", (600, 300), GREY)
    pre, kept, post = _stage_inputs()
    fig = stages_figure(photo, pre, kept, post)
    w, h = fig.size
    assert 256 < h < 256 + 60  # one 256 px panel row plus a title strip
    assert 3 * 512 <= w < 3 * 512 + 60  # three panels at the photo's 2:1 aspect ratio
    arr = np.asarray(fig).astype(int)
    row = h - 128  # middle of the panels
    x1 = lambda i, x: 6 + i * (512 + 6) + x  # noqa: E731 - panel i, column x (gap 6 px)
    # Panel 2: dropped cluster 1 (x in [128, 256)) is grey; kept cluster 2 has the same colour as in panel 1.
    dropped = arr[row, x1(1, 190)]
    assert max(dropped) - min(dropped) < 10
    kept_p1, kept_p2 = arr[row, x1(0, 320)], arr[row, x1(1, 320)]
    assert max(kept_p2) - min(kept_p2) > 40  # still coloured
    assert np.argmax(kept_p1) == np.argmax(kept_p2)  # same dominant channel as in panel 1
    # Title strip is mostly white with some dark text pixels.
    strip = arr[: h - 256 - 6]
    assert (strip == 255).mean() > 0.9 and (strip < 100).any()


def test_stages_figure_portrait_and_validation():
    photo = Image.new("RGB", (100, 400), GREY)
    pre, kept, post = _stage_inputs()
    fig = stages_figure(photo, pre.T, kept, post.T)  # narrow 64 px panels: slots widen for the titles
    assert fig.size[1] > 256 and fig.size[0] > 3 * 64
    with pytest.raises(ValueError, match="kept"):
        stages_figure(photo, pre, kept[:2], post)
