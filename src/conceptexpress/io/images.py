"""Reading the input photo, sizing it for the model, and bringing latent-size masks back to the photo's size.

``load_image`` is the single door through which a user's file enters the pipeline: whatever the file's mode
(grayscale, palette, alpha, 16-bit, CMYK, EXIF-rotated, animated) it returns an 8-bit RGB image, and whatever is
wrong with it (missing, not an image, truncated, too small, too large) it raises ``InputError`` with a one-line
message that names the file. Every table row of ``docs/inputs.md`` is a branch of this module.
"""

from __future__ import annotations

import math
import re
import threading
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from conceptexpress.errors import ConfigError, InputError

# Shorter side, in source pixels, below which an image cannot hold a concept: at the default 512 px working
# resolution the latent is 64x64; a 32 px side is already upscaled 16x to reach it, and smaller sources carry
# too little detail for the attention to separate objects.
MIN_SIDE = 32

# Largest width*height accepted, checked from the header before any pixel is decoded. 8192^2 (67 Mpx, ~200 MB
# as RGB) covers every camera in common use; a file claiming more is treated as a decompression bomb. Raise it
# by assigning ``conceptexpress.io.images.MAX_PIXELS``. PIL's own guard (``PIL.Image.MAX_IMAGE_PIXELS``,
# ~89 Mpx) still applies on top, so the effective limit is the smaller of the two.
MAX_PIXELS = 8192 * 8192

# Modes whose pixels carry transparency; they are composited over white so that transparent regions read as
# empty background rather than as black objects.
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}

# ``ImageFile.LOAD_TRUNCATED_IMAGES`` is process-global; load_image switches it off for the duration of a
# decode so a truncated file is reported, and the lock keeps concurrent calls from restoring a stale value.
_TRUNCATION_LOCK = threading.Lock()

_PIL_BOMB_RE = re.compile(r"\((\d+) pixels\) exceeds limit of (\d+) pixels")


def _fail(path: Path, problem: str) -> InputError:
    """One-line ``InputError`` naming the file; collapses whitespace so PIL messages stay on one line."""
    return InputError(" ".join(f"input image '{path}': {problem}".split()))


def _bomb_message(pixels: int, size: tuple[int, int] | None, limit: int, setting: str) -> str:
    dims = f" ({size[0]}x{size[1]})" if size is not None else ""
    return (
        f"{pixels} pixels{dims} exceeds the limit of {limit} pixels; refusing to decode a possible "
        f"decompression bomb (raise {setting} to allow it)"
    )


def _pil_bomb_problem(e: Exception) -> str:
    """Reword PIL's DecompressionBombError/Warning in this module's terms (its limit, not ours, was hit)."""
    m = _PIL_BOMB_RE.search(str(e))
    return _bomb_message(int(m[1]), None, int(m[2]), "PIL.Image.MAX_IMAGE_PIXELS") if m else str(e)


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as 8-bit RGB with its EXIF orientation applied.

    Any mode Pillow can open is accepted and normalized by :func:`to_rgb` (grayscale, 1-bit, palette, alpha
    composited over white, 16/32-bit integer or float grayscale scaled by bit depth, CMYK). Animated files give
    their first frame. The returned image has mode ``"RGB"``, uint8 values in [0, 255], size ``(W, H)`` as
    displayed (a portrait JPEG stored landscape with Orientation=6 comes back portrait).

    Raises:
        InputError: the file is missing, a folder, unreadable, not an image, truncated or corrupt, has a
            shorter side below ``MIN_SIDE`` px, or more than ``MAX_PIXELS`` pixels (checked from the header,
            before decoding).
    """
    path = Path(path)
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a folder, not an image file")

    # 1. Open (header only) with PIL's bomb warning escalated: a warning alone would scroll past unseen.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except UnidentifiedImageError:
        raise _fail(path, "not an image (Pillow cannot identify its format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _fail(path, _pil_bomb_problem(e)) from None
    except PermissionError:
        raise _fail(path, "permission denied") from None
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from None
    except (SyntaxError, ValueError, EOFError) as e:
        # Plugins signal a broken header with SyntaxError / ValueError.
        raise _fail(path, f"corrupt image header ({e})") from None

    with im:
        # 2. Size checks from the header, before any pixel is decoded.
        w, h = im.size
        if w * h > MAX_PIXELS:
            raise _fail(path, _bomb_message(w * h, (w, h), MAX_PIXELS, "conceptexpress.io.images.MAX_PIXELS"))
        if min(w, h) < MIN_SIDE:
            raise _fail(
                path, f"{w}x{h} px is too small to hold a concept (shorter side must be >= {MIN_SIDE} px)"
            )

        # 3. Full decode of the first frame; truncation must raise even if a caller enabled tolerance globally.
        try:
            with _TRUNCATION_LOCK:
                tolerant = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
                try:
                    if getattr(im, "n_frames", 1) > 1:
                        im.seek(0)
                    im.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = tolerant
        except Image.DecompressionBombError as e:
            raise _fail(path, _pil_bomb_problem(e)) from None
        except (OSError, SyntaxError, ValueError, EOFError, IndexError) as e:
            raise _fail(path, f"truncated or corrupt image data ({e})") from None

        # 4. Orientation, then mode normalization.
        try:
            oriented = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a malformed EXIF block must not make a readable photo unusable
            oriented = im.copy()
        try:
            return to_rgb(oriented)
        except ValueError as e:
            raise _fail(path, str(e)) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Normalize any Pillow image to mode ``"RGB"`` (uint8 per channel, values in [0, 255]).

    - ``1``, ``L``, ``P`` without transparency, ``CMYK``, ``YCbCr``: Pillow's conversion.
    - ``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry: alpha composited over white.
    - ``I;16*`` (16-bit), ``I`` (32-bit int), ``F`` (32-bit float) grayscale: scaled to 8 bits by bit depth
      (``round(v * 255 / (2**bits - 1))``), never clipped; see :func:`_wide_gray_to_l` for the depth rules.

    Raises:
        ValueError: the mode has no RGB conversion (e.g. ``LAB`` without a colour profile).
    """
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        return _wide_gray_to_l(img).convert("RGB")
    if mode in _ALPHA_MODES or (mode in {"1", "L", "P", "RGB"} and "transparency" in img.info):
        # Colour-keyed transparency (tRNS in PNG/GIF) is expanded to an alpha channel by convert("RGBA").
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
        return img.copy()
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"unsupported colour mode {mode!r} ({e})") from None


def _wide_gray_to_l(img: Image.Image) -> Image.Image:
    """Scale a 16-bit, 32-bit integer or float grayscale image to mode ``L`` by its bit depth.

    Pillow's own ``convert("L")`` clips these modes at 255, which turns most 16-bit photos white. Bit depth:
    TIFF ``BitsPerSample`` when present (12-bit scientific TIFFs); else 16 for ``I;16*``; for ``I`` 16 when all
    values lie in [0, 65535] (16-bit PNGs decode to ``I`` in some Pillow versions) and 31 otherwise. Integer data
    with negative values, and float data outside [0, 1], are min-max normalized instead.
    """
    arr = np.asarray(img)
    if arr.ndim != 2:
        raise ValueError(f"unsupported colour mode {img.mode!r} with shape {arr.shape}")
    if img.mode == "F":
        a = arr.astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        unit = a if (lo >= 0.0 and hi <= 1.0) else (a - lo) / (hi - lo if hi > lo else 1.0)
        return Image.fromarray(np.rint(unit * 255.0).astype(np.uint8), mode="L")

    a = arr.astype(np.int64)
    lo, hi = int(a.min()), int(a.max())
    if lo < 0:
        unit = (a - lo) / float(hi - lo if hi > lo else 1)
        return Image.fromarray(np.rint(unit * 255.0).astype(np.uint8), mode="L")
    bits = _tiff_bits(img)
    if bits is None:
        bits = 16 if (img.mode.startswith("I;16") or hi <= 0xFFFF) else 31
    top = (1 << bits) - 1
    out = np.rint(np.minimum(a, top) * (255.0 / top)).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def _tiff_bits(img: Image.Image) -> int | None:
    """The TIFF BitsPerSample tag (258) of ``img`` if it has one in 1..32, else None."""
    tags = getattr(img, "tag_v2", None)
    if not tags or 258 not in tags:
        return None
    value = tags[258]
    bits = value[0] if isinstance(value, tuple) else value
    return int(bits) if isinstance(bits, int) and 1 <= bits <= 32 else None


def model_input_size(size_wh: tuple[int, int], resolution: int, multiple: int = 8) -> tuple[int, int]:
    """Working size ``(W, H)`` fed to the VAE for a source image of size ``size_wh = (W, H)``.

    Keeps the aspect ratio: the longer side becomes ``resolution``; the shorter side becomes
    ``resolution * short / long`` rounded (half up) to the nearest multiple of ``multiple`` (the VAE factor), and
    is at least ``multiple``. A square source gives ``(resolution, resolution)``.

    Raises:
        ConfigError: ``resolution`` is not a positive multiple of ``multiple``, or ``multiple`` < 1.
        ValueError: ``size_wh`` has a non-positive side.
    """
    if multiple < 1:
        raise ConfigError(f"multiple must be >= 1, got {multiple}")
    if resolution < multiple or resolution % multiple:
        raise ConfigError(f"resolution must be a positive multiple of {multiple}, got {resolution}")
    w, h = (int(s) for s in size_wh)
    if w < 1 or h < 1:
        raise ValueError(f"size_wh must be two positive integers, got {size_wh}")
    long_side, short_side = max(w, h), min(w, h)
    short = math.floor(resolution * short_side / long_side / multiple + 0.5) * multiple
    short = max(multiple, min(resolution, short))
    return (resolution, short) if w >= h else (short, resolution)


def image_to_tensor(img: Image.Image, size_wh: tuple[int, int]) -> torch.Tensor:
    """Resize ``img`` to ``size_wh = (W, H)`` and return it as the VAE expects.

    Resampling is PIL ``BICUBIC``, which Pillow antialiases when shrinking (its filter support scales with the
    reduction), so large photos do not alias. Non-RGB images are first normalized with :func:`to_rgb`.

    Returns:
        (1, 3, H, W) float32 tensor with values in [-1, 1] (0 -> -1, 255 -> 1).
    """
    rgb = img if img.mode == "RGB" else to_rgb(img)
    size = (int(size_wh[0]), int(size_wh[1]))
    if rgb.size != size:
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    arr = np.asarray(rgb, dtype=np.float32)  # (H, W, 3) in [0, 255]
    t = torch.from_numpy(arr.copy()).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W)
    return t / 127.5 - 1.0


def upsample_masks(masks: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize concept masks from latent size to ``size_wh = (W, H)`` with smooth edges and no overlaps.

    The one-hot stack of the N masks plus a background channel (1 - union) is bilinearly resized channel by
    channel (antialiased when shrinking) and each output pixel goes to the channel with the largest value;
    ties favour the lower concept index over the background. Resizing masks one by one and thresholding would
    let neighbours overlap or leave slivers unassigned between them.

    Args:
        masks: (N, h, w) bool (any dtype is cast to bool).
        size_wh: target ``(W, H)``.

    Returns:
        (N, H, W) bool, pairwise disjoint; ``(0, H, W)`` when N == 0.
    """
    masks = np.asarray(masks).astype(bool, copy=False)
    if masks.ndim != 3:
        raise ValueError(f"masks must have shape (N, h, w), got {masks.shape}")
    width, height = int(size_wh[0]), int(size_wh[1])
    n = masks.shape[0]
    if n == 0:
        return np.zeros((0, height, width), dtype=bool)

    background = ~masks.any(axis=0)
    # Running max over channels: memory stays at a few (H, W) planes however many concepts there are.
    best = None
    label = np.full((height, width), n, dtype=np.int32)  # n = background
    for k, plane in enumerate([*masks, background]):
        src = torch.from_numpy(plane.astype(np.float32))[None, None]  # (1, 1, h, w)
        up = F.interpolate(src, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        up = up[0, 0].numpy()  # (H, W) float32 in [0, 1]
        if best is None:
            best = up
            label[:] = k
        else:
            win = up > best  # strict: earlier channels keep ties
            best = np.where(win, up, best)
            label[win] = k
    return label[None] == np.arange(n, dtype=np.int32)[:, None, None]
