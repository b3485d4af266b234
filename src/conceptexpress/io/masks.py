"""A user's object masks: one mask file, or a folder of them (``extract --masks DIR``, ``edit --add-mask``).

The one place a mask file's format is decided:

* any image Pillow opens, EXIF orientation applied;
* inside = non-zero luminance, and where the file has an alpha channel, opaque (alpha > 0) pixels only — so a
  black-and-white PNG, a grayscale soft mask, SAM's 0/1 or 0/255 output and an RGBA cut-out all work.

A mask folder (:func:`read_mask_folder`) gives one concept per image file, in natural order of the file names
(``mask2.png`` before ``mask10.png``; Break-A-Scene's ``mask0.png``, ``mask1.png``, …): concept ``i`` is the i-th
file, and the i-th initializer word (``--init-words``) belongs to it. Files whose suffix is not an image suffix,
and hidden files, are ignored. Every mask must be non-empty, at the photo's size or at another size of the same
aspect ratio (then resized, nearest neighbour), and no pixel may lie in two masks: the run folder's concepts are
disjoint regions (overlay, latent masks, evaluation), as ConceptExpress's own localization makes them.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ConfigError, InputError

__all__ = ["MASK_SUFFIXES", "MaskFolder", "read_mask", "read_mask_folder"]

MASK_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# Two aspect ratios closer than this (relative) count as the same: 512x512 masks for a 1024x1024 photo, or a
# 1000x667 mask for a 1500x1000 photo (rounding of the shorter side).
_ASPECT_TOL = 0.01


def read_mask(path: str | Path) -> np.ndarray:
    """A user's mask file as (H, W) bool: non-zero luminance inside, and where it has alpha, opaque pixels only.

    Raises:
        InputError: the file is missing or not a readable image.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            alpha = np.asarray(im.getchannel("A")) > 0 if "A" in im.getbands() else None
            inside = np.asarray(im.convert("L")) > 0
    except FileNotFoundError:
        raise InputError(f"mask '{path}': no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"mask '{path}': not a readable image ({' '.join(str(e).split())})") from None
    return inside & alpha if alpha is not None else inside


@dataclass(frozen=True)
class MaskFolder:
    """The masks of a folder at the photo's size: ``masks`` (N, H, W) bool, ``files`` their names in concept order,
    ``sha256`` one digest over the names and bytes of the files (what decides whether a localization is reused)."""

    folder: Path
    files: tuple[str, ...]
    masks: np.ndarray
    sha256: str

    @property
    def num_concepts(self) -> int:
        return len(self.files)


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _to_size(mask: np.ndarray, size_wh: tuple[int, int], path: Path) -> np.ndarray:
    w, h = size_wh
    mh, mw = mask.shape
    if (mw, mh) == (w, h):
        return mask
    if abs((mw / mh) / (w / h) - 1.0) > _ASPECT_TOL:
        raise ConfigError(
            f"mask '{path}' is {mw}x{mh} but the photo is {w}x{h} (another aspect ratio); draw the masks on the photo"
        )
    img = Image.fromarray(mask.astype(np.uint8) * 255, mode="L").resize((w, h), Image.Resampling.NEAREST)
    return np.asarray(img) > 0


def read_mask_folder(folder: str | Path, image_size: tuple[int, int]) -> MaskFolder:
    """Read every mask of ``folder`` for a photo of size ``image_size = (W, H)`` (rules in the module docstring).

    Cheap (no model): ``extract`` calls it before loading anything.

    Raises:
        ConfigError: the folder is missing or holds no mask image, a mask is empty or has another aspect ratio,
            or two masks overlap. InputError: a mask file is not a readable image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"`masks` must be a folder of mask images, got {str(root)!r} (no such folder)")
    paths = sorted(
        (p for p in root.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in MASK_SUFFIXES),
        key=lambda p: _natural_key(p.name),
    )
    if not paths:
        raise ConfigError(
            f"`masks` folder {str(root)!r} holds no mask image ({', '.join(MASK_SUFFIXES)}); put one file per concept there"
        )
    digest = hashlib.sha256()
    masks = []
    for p in paths:
        data = p.read_bytes()
        digest.update(p.name.encode() + b"\0" + hashlib.sha256(data).digest())
        m = _to_size(read_mask(p), image_size, p)
        if not m.any():
            raise ConfigError(f"mask '{p}' is empty (no non-zero pixel); every mask must cover its concept")
        masks.append(m)
    stack = np.stack(masks)  # (N, H, W)
    count = stack.sum(0, dtype=np.int32)  # (H, W)
    if (count > 1).any():
        i, j = next(
            (i, j) for i in range(len(paths)) for j in range(i + 1, len(paths)) if (stack[i] & stack[j]).any()
        )
        overlap = int((stack[i] & stack[j]).sum())
        raise ConfigError(
            f"masks '{paths[i].name}' and '{paths[j].name}' in {str(root)!r} overlap on {overlap} pixels; "
            "concepts must be disjoint regions"
        )
    return MaskFolder(folder=root, files=tuple(p.name for p in paths), masks=stack, sha256=digest.hexdigest())
