"""Input images: every unusual-but-valid file loads as 8-bit RGB; every invalid one raises a one-line InputError.

Each test name is cited in docs/inputs.md next to the behaviour it checks.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from conceptexpress.errors import ConfigError, InputError
from conceptexpress.io import image_to_tensor, load_image, model_input_size, to_rgb, upsample_masks
from conceptexpress.io import images as images_mod

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def _assert_rgb(img: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert img.mode == "RGB"
    assert img.size == size
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.shape == (size[1], size[0], 3)
    return arr


def _assert_input_error(path: Path, match: str) -> str:
    with pytest.raises(InputError, match=match) as info:
        load_image(path)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert str(path) in msg, msg
    assert info.value.exit_code == 3
    return msg


def _close(px, ref, tol: int = 12) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(px, ref))


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), mode="RGB")


def _png_with_size(path: Path, w: int, h: int) -> Path:
    """A tiny valid PNG whose IHDR is patched to claim ``w`` x ``h`` (CRC recomputed): a cheap bomb header."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------- unusual but valid


def test_rgb_passthrough(tmp_path):
    src = _noise(48, 40)
    src.save(tmp_path / "rgb.png")
    arr = _assert_rgb(load_image(tmp_path / "rgb.png"), (48, 40))
    np.testing.assert_array_equal(arr, np.asarray(src))


def test_grayscale_L(tmp_path):
    Image.new("L", (40, 36), 77).save(tmp_path / "gray.png")
    arr = _assert_rgb(load_image(str(tmp_path / "gray.png")), (40, 36))
    assert (arr == 77).all()


def test_one_bit(tmp_path):
    im = Image.new("1", (40, 40), 0)
    im.paste(1, (0, 0, 20, 40))
    im.save(tmp_path / "bw.png")
    arr = _assert_rgb(load_image(tmp_path / "bw.png"), (40, 40))
    assert (arr[:, :20] == 255).all() and (arr[:, 20:] == 0).all()


def _palette_image() -> Image.Image:
    im = Image.new("P", (40, 40), 0)
    im.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    im.paste(1, (20, 0, 40, 40))
    return im


def test_palette(tmp_path):
    _palette_image().save(tmp_path / "pal.png")
    arr = _assert_rgb(load_image(tmp_path / "pal.png"), (40, 40))
    assert tuple(arr[5, 5]) == RED and tuple(arr[5, 30]) == BLUE


def test_palette_with_transparency_over_white(tmp_path):
    _palette_image().save(tmp_path / "pal_t.png", transparency=1)
    arr = _assert_rgb(load_image(tmp_path / "pal_t.png"), (40, 40))
    assert tuple(arr[5, 5]) == RED and tuple(arr[5, 30]) == WHITE


def test_rgba_composited_over_white(tmp_path):
    im = Image.new("RGBA", (40, 40), (255, 0, 0, 255))
    im.paste((0, 0, 255, 0), (20, 0, 40, 20))  # fully transparent
    im.paste((255, 0, 0, 128), (20, 20, 40, 40))  # half transparent
    im.save(tmp_path / "rgba.png")
    arr = _assert_rgb(load_image(tmp_path / "rgba.png"), (40, 40))
    assert tuple(arr[5, 5]) == RED
    assert tuple(arr[5, 30]) == WHITE
    assert _close(arr[30, 30], (255, 127, 127), tol=2)


def test_la_composited_over_white(tmp_path):
    im = Image.new("LA", (40, 40), (0, 255))
    im.paste((0, 0), (20, 0, 40, 40))
    im.save(tmp_path / "la.png")
    arr = _assert_rgb(load_image(tmp_path / "la.png"), (40, 40))
    assert (arr[:, :20] == 0).all() and (arr[:, 20:] == 255).all()


def test_16bit_png_scaled_not_clipped(tmp_path):
    values = np.array([0, 257 * 100, 32768, 65535], dtype=np.uint16)
    arr16 = np.repeat(values, 10)[None].repeat(40, axis=0)  # (40, 40) uint16, four vertical bands
    Image.fromarray(arr16).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    arr = _assert_rgb(load_image(tmp_path / "gray16.png"), (40, 40))
    assert list(arr[0, ::10, 0]) == [0, 100, 128, 255]  # clipping would give [0, 255, 255, 255]


def test_32bit_int_and_float_grayscale():
    ints = Image.fromarray(np.array([[0, 65535]] * 2, dtype=np.int32))
    assert ints.mode == "I"
    assert list(np.asarray(to_rgb(ints))[0, :, 0]) == [0, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]] * 2, dtype=np.float32))
    assert floats.mode == "F"
    assert list(np.asarray(to_rgb(floats))[0, :, 0]) == [0, 128, 255]
    wide = Image.fromarray(np.array([[-10.0, 0.0, 30.0]] * 2, dtype=np.float32))
    assert list(np.asarray(to_rgb(wide))[0, :, 0]) == [0, 64, 255]  # min-max outside [0, 1]


def test_32bit_tiff(tmp_path):
    Image.fromarray(np.full((40, 40), 65535, dtype=np.int32)).save(tmp_path / "i32.tif")
    arr = _assert_rgb(load_image(tmp_path / "i32.tif"), (40, 40))
    assert (arr == 255).all()


def test_cmyk_jpeg(tmp_path):
    Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    arr = _assert_rgb(load_image(tmp_path / "cmyk.jpg"), (64, 48))
    assert _close(arr[24, 32], RED, tol=20)


def test_exif_rotated_jpeg(tmp_path):
    # Stored landscape 60x40: left half red, right half blue. Orientation=6 means "rotate 90 deg clockwise
    # to display", so the displayed image is portrait 40x60 with red on top and blue at the bottom.
    im = Image.new("RGB", (60, 40), BLUE)
    im.paste(RED, (0, 0, 30, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    arr = _assert_rgb(load_image(tmp_path / "rot.jpg"), (40, 60))
    assert _close(arr[10, 20], RED, tol=30)
    assert _close(arr[50, 20], BLUE, tol=30)


def test_non_square(tmp_path):
    _noise(100, 60).save(tmp_path / "wide.png")
    img = load_image(tmp_path / "wide.png")
    _assert_rgb(img, (100, 60))
    assert model_input_size(img.size, 512) == (512, 304)  # 307.2 -> 304


def test_animated_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 40), RED), Image.new("RGB", (40, 40), BLUE)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(tmp_path / "anim.gif").n_frames == 2
    arr = _assert_rgb(load_image(tmp_path / "anim.gif"), (40, 40))
    assert _close(arr[20, 20], RED, tol=5)


def test_min_side_is_accepted(tmp_path):
    _noise(32, 200).save(tmp_path / "thin.png")
    _assert_rgb(load_image(tmp_path / "thin.png"), (32, 200))


# ---------------------------------------------------------------- invalid


def test_missing_file(tmp_path):
    _assert_input_error(tmp_path / "nope.jpg", "no such file")


def test_directory(tmp_path):
    (tmp_path / "folder.png").mkdir()
    _assert_input_error(tmp_path / "folder.png", "is a folder")


def test_text_file_named_png(tmp_path):
    (tmp_path / "notes.png").write_text("hello, I am not a picture\n")
    _assert_input_error(tmp_path / "notes.png", "not an image")


def test_empty_file(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    _assert_input_error(tmp_path / "empty.jpg", "not an image")


def test_unreadable_file(tmp_path, monkeypatch):
    _noise(40, 40).save(tmp_path / "locked.png")

    def refuse(*args, **kwargs):  # tests run as root, where chmod 000 would not stop the read
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(images_mod.Image, "open", refuse)
    _assert_input_error(tmp_path / "locked.png", "permission denied")


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_truncated(tmp_path, fmt):
    full = tmp_path / f"full.{fmt}"
    _noise(96, 64).save(full)
    cut = tmp_path / f"cut.{fmt}"
    data = full.read_bytes()
    cut.write_bytes(data[: int(len(data) * 0.6)])
    _assert_input_error(cut, "truncated")


def test_truncated_even_when_pil_tolerates_truncation(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    full = tmp_path / "full.png"
    _noise(96, 64).save(full)
    cut = tmp_path / "cut.png"
    cut.write_bytes(full.read_bytes()[:600])
    _assert_input_error(cut, "truncated")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


def test_corrupt_png_data(tmp_path):
    full = tmp_path / "full.png"
    _noise(96, 64).save(full)
    data = bytearray(full.read_bytes())
    start = data.index(b"IDAT") + 4
    data[start + 50 : start + 250] = bytes(200)  # zero out part of the compressed stream
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    _assert_input_error(bad, "corrupt")


@pytest.mark.parametrize("size", [(20, 20), (20, 200)])
def test_too_small(tmp_path, size):
    _noise(*size).save(tmp_path / "small.png")
    msg = _assert_input_error(tmp_path / "small.png", "too small")
    assert f"{size[0]}x{size[1]}" in msg and "32" in msg


@pytest.mark.parametrize(
    "side",
    [
        9000,  # 81 Mpx: over MAX_PIXELS, under PIL's limit -> our header check
        10000,  # 100 Mpx: PIL's DecompressionBombWarning, escalated
        30000,  # 900 Mpx: PIL's DecompressionBombError
    ],
)
def test_decompression_bomb_header(tmp_path, side):
    path = _png_with_size(tmp_path / "bomb.png", side, side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        msg = _assert_input_error(path, "decompression bomb")
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert str(side * side) in msg and "limit" in msg


def test_max_pixels_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 50 * 50)
    _noise(64, 64).save(tmp_path / "img.png")
    msg = _assert_input_error(tmp_path / "img.png", "decompression bomb")
    assert "4096 pixels (64x64)" in msg and "2500" in msg


# ---------------------------------------------------------------- sizing and tensors


@pytest.mark.parametrize(
    ("size", "resolution", "expected"),
    [
        ((512, 512), 512, (512, 512)),
        ((37, 37), 512, (512, 512)),
        ((640, 480), 512, (512, 384)),
        ((480, 640), 512, (384, 512)),
        ((3000, 2000), 512, (512, 344)),  # 341.3 -> nearest multiple of 8
        ((4000, 10), 512, (512, 8)),  # at least one multiple
        ((10, 4000), 768, (8, 768)),
        ((1920, 1080), 64, (64, 40)),  # 36 -> 40 (half up)
    ],
)
def test_model_input_size(size, resolution, expected):
    out = model_input_size(size, resolution)
    assert out == expected
    assert out[0] % 8 == 0 and out[1] % 8 == 0


def test_model_input_size_other_multiple():
    assert model_input_size((300, 200), 512, multiple=64) == (512, 320)


@pytest.mark.parametrize("resolution", [0, 500, -8])
def test_model_input_size_bad_resolution(resolution):
    with pytest.raises(ConfigError, match=str(resolution)):
        model_input_size((100, 100), resolution)


def test_image_to_tensor():
    img = Image.new("RGB", (40, 30), WHITE)
    img.paste((0, 0, 0), (0, 0, 20, 30))
    t = image_to_tensor(img, (16, 8))
    assert t.shape == (1, 3, 8, 16) and t.dtype == torch.float32
    assert t.min() >= -1.0 and t.max() <= 1.0
    assert torch.allclose(t[..., :2], torch.tensor(-1.0)) and torch.allclose(t[..., -2:], torch.tensor(1.0))
    gray = image_to_tensor(Image.new("L", (8, 8), 255), (8, 8))  # non-RGB is normalized
    assert gray.shape == (1, 3, 8, 8) and torch.allclose(gray, torch.tensor(1.0))


# ---------------------------------------------------------------- masks


def _latent_labels(h: int = 8, w: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1, 3, (h, w))  # (h, w) int in [-1, 3)


def test_upsample_masks_no_overlap_and_shape():
    labels = _latent_labels()
    masks = labels[None] == np.arange(3)[:, None, None]  # (3, 8, 12) bool
    out = upsample_masks(masks, (50, 37))
    assert out.shape == (3, 37, 50) and out.dtype == bool
    assert out.sum(axis=0).max() <= 1
    assert all(out[k].any() for k in range(3))


def test_upsample_masks_keeps_cell_centres():
    labels = _latent_labels()
    masks = labels[None] == np.arange(3)[:, None, None]
    out = upsample_masks(masks, (48, 32))  # 4x: pixel 4i+1 lies next to the centre of latent cell i
    np.testing.assert_array_equal(out[:, 1::4, 1::4], masks)


def test_upsample_masks_partition_stays_partition():
    labels = np.random.default_rng(1).integers(0, 4, (6, 6))
    masks = labels[None] == np.arange(4)[:, None, None]
    out = upsample_masks(masks, (41, 23))
    assert (out.sum(axis=0) == 1).all()


def test_upsample_masks_downsample_and_empty():
    masks = np.zeros((2, 64, 64), dtype=bool)
    masks[0, :32], masks[1, 32:] = True, True
    out = upsample_masks(masks, (40, 40))
    assert out.shape == (2, 40, 40) and out.sum(axis=0).max() <= 1
    assert out[0, :18].all() and out[1, 22:].all()
    assert upsample_masks(np.zeros((0, 8, 8), dtype=bool), (30, 20)).shape == (0, 20, 30)
