"""Localization-benchmark datasets: images with ground-truth instance masks (paper §4.5), and a CLEVR converter.

Layout (documented in ``docs/localization-benchmark.md``)::

    DATASET/images/<name>.png|.jpg|.jpeg|.webp   the photos
    DATASET/masks/<name>.png                      instance label map: single channel, 8- or 16-bit (or 1-bit);
                                                  0 = background, every other value one instance
    or
    DATASET/masks/<name>/<any>.png                one binary mask per instance (non-zero = inside)

Instance values need not be consecutive. Masks must have the image's size (as displayed, after EXIF rotation).
Every problem is an :class:`~conceptexpress.errors.InputError` with a one-line message naming the file.

:func:`convert_clevr_masks` turns colour-coded instance maps (RGB, palette or grey, one colour per instance,
e.g. CLEVR-with-masks exports) into this layout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from conceptexpress.errors import InputError, OutputError
from conceptexpress.io.atomic import atomic_save_image, atomic_write_bytes, ensure_output_dir
from conceptexpress.io.images import load_image

__all__ = [
    "IMAGE_SUFFIXES",
    "BenchSample",
    "convert_clevr_masks",
    "load_dataset",
    "parse_background",
    "read_instance_masks",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# Single-channel modes whose pixel values are instance ids (PIL reads 16-bit PNGs as I;16 or I).
_LABEL_MODES = {"1", "L", "I", "I;16", "I;16B", "I;16L", "I;16N"}
_EXIF_ORIENTATION = 0x0112
_MAX_INSTANCES = 255  # converted label maps are 8-bit


@dataclass(frozen=True)
class BenchSample:
    """One image of a benchmark dataset and where its ground truth lives (a label-map file or a folder)."""

    name: str
    image_path: Path
    mask_path: Path

    def load(self) -> tuple[Image.Image, np.ndarray]:
        """``(image, gt)``: the photo as 8-bit RGB (``load_image``) and (G, H, W) bool instance masks, G >= 1.

        Raises:
            InputError: unreadable files, a size mismatch, or no instance in the ground truth.
        """
        image = load_image(self.image_path)
        gt = read_instance_masks(self.mask_path)
        _check_gt(self, gt, image.size)
        return image, gt


def load_dataset(folder: str | Path, *, limit: int | None = None, check: bool = True) -> list[BenchSample]:
    """List the samples of a dataset in natural name order (``scene_2`` before ``scene_10``).

    Args:
        folder: the dataset folder (layout in the module docstring).
        limit: keep only the first ``limit`` samples.
        check: also read every ground truth now and compare its size with the image header, so that a bad
            dataset fails before any model is loaded (reading label maps is cheap; images are not decoded).

    Raises:
        InputError: the folder or ``images/`` is missing, holds no image, two images share a name, an image has
            no mask, or (with ``check``) a mask is unreadable, empty, or not the image's size.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"dataset folder '{folder}' does not exist or is not a folder")
    images_dir, masks_dir = folder / "images", folder / "masks"
    if not images_dir.is_dir():
        raise InputError(
            f"dataset '{folder}' has no images/ folder (expected images/<name>.png and masks/<name>.png)"
        )
    images = _image_files(images_dir.iterdir())
    if not images:
        raise InputError(f"dataset '{folder}' is empty: no {'/'.join(IMAGE_SUFFIXES)} file in '{images_dir}'")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise InputError(f"`limit` must be a positive integer, got {limit!r}")
        images = images[:limit]
    samples = [BenchSample(p.stem, p, _mask_path(masks_dir, p)) for p in images]
    if check:
        for sample in samples:
            _check_gt(sample, read_instance_masks(sample.mask_path), _image_size(sample.image_path))
    return samples


def read_instance_masks(path: str | Path) -> np.ndarray:
    """(G, H, W) bool instance masks from a label-map file or a folder of per-instance masks.

    Label map: a single-channel PNG (1-, 8- or 16-bit); 0 is background, each other value one instance, in
    increasing value order. Folder: every ``*.png`` inside, in natural name order, one instance each; any
    non-zero pixel (after conversion to grayscale) is inside; an all-zero file is skipped with a warning.

    Raises:
        InputError: unreadable file, a colour or palette label map, negative labels, or folder masks of
            different sizes.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(
            (p for p in path.iterdir() if p.suffix.lower() == ".png"), key=lambda p: _natural(p.name)
        )
        if not files:
            raise InputError(f"mask folder '{path}' holds no .png instance mask")
        masks = []
        for f in files:
            im = _open(f, "instance mask")
            arr = np.asarray(im if im.mode in _LABEL_MODES else im.convert("L")) != 0  # (H, W)
            if masks and arr.shape != masks[0].shape:
                raise InputError(
                    f"instance mask '{f}' is {arr.shape[1]}x{arr.shape[0]} but '{files[0]}' is "
                    f"{masks[0].shape[1]}x{masks[0].shape[0]}"
                )
            if not arr.any():
                logger.warning("instance mask '%s' is empty; skipped", f)
                continue
            masks.append(arr)
        h, w = arr.shape
        return np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)

    im = _open(path, "label map")
    if im.mode not in _LABEL_MODES:
        raise InputError(
            f"label map '{path}' has mode {im.mode}; it must be a single-channel 8- or 16-bit PNG (0 = background, "
            "1..K instances) - convert colour-coded maps with convert_clevr_masks / bench-localize --from-clevr"
        )
    labels = np.asarray(im).astype(np.int64)  # (H, W)
    if labels.min() < 0:
        raise InputError(f"label map '{path}' has negative values (min {labels.min()})")
    values = np.unique(labels)
    values = values[values != 0]
    return labels[None] == values[:, None, None]


def parse_background(text: str) -> str | int | tuple[int, int, int]:
    """Parse a background spec: ``auto``, an index ``0``, a colour ``0,0,0`` or ``#000000``.

    Raises:
        InputError: anything else.
    """
    t = text.strip().lower()
    try:
        if t == "auto":
            return "auto"
        if t.startswith("#") and len(t) == 7:
            return tuple(int(t[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        if "," in t:
            rgb = tuple(int(v) for v in t.split(","))
            if len(rgb) == 3 and all(0 <= v <= 255 for v in rgb):
                return rgb  # type: ignore[return-value]
        elif int(t) >= 0:
            return int(t)
    except ValueError:
        pass
    raise InputError(
        f"background must be 'auto', an index like '0', or a colour like '0,0,0' or '#000000'; got {text!r}"
    )


def convert_clevr_masks(
    src_folder: str | Path,
    dst_dataset: str | Path,
    *,
    background: str | int | tuple[int, int, int] = "auto",
    min_pixels: int = 0,
    overwrite: bool = False,
) -> Path:
    """Convert colour-coded instance maps (CLEVR-with-masks style) into the benchmark layout.

    Source: ``src_folder/images/<name>.<ext>`` and ``src_folder/masks/<name>.png``, where every distinct colour
    of a mask is one instance: RGB-coded (RGBA: alpha ignored), palette-coded (the palette *index* is the
    instance) or grey-coded (the value is the instance). Destination: ``dst_dataset/images/`` (byte copies) and
    ``dst_dataset/masks/<name>.png`` 8-bit label maps, instances numbered 1..K by first pixel in raster order.

    Args:
        background: the background's colour ``(r, g, b)`` for RGB-coded masks, its index / value for palette
            or grey masks (an RGB tuple also works on palette masks: they are then read as RGB), or ``"auto"``:
            the most frequent colour on the mask's border (CLEVR objects rarely cover the whole border).
        min_pixels: colours covering fewer pixels become background (e.g. antialiased edges of resized masks).
        overwrite: allow writing into a dataset whose ``images/`` already holds files.

    Returns:
        ``dst_dataset``.

    Raises:
        InputError: a missing source folder or mask, a lossy (JPEG) mask, a size mismatch, a mask with no
            instance or more than 255 of them.
        OutputError: the destination already holds images and ``overwrite`` is False.
    """
    src, dst = Path(src_folder), Path(dst_dataset)
    if not (src / "images").is_dir() or not (src / "masks").is_dir():
        raise InputError(f"CLEVR source '{src}' must hold images/ and masks/ folders")
    images = _image_files((src / "images").iterdir())
    if not images:
        raise InputError(f"CLEVR source '{src}/images' holds no {'/'.join(IMAGE_SUFFIXES)} file")
    if (dst / "images").is_dir() and any((dst / "images").iterdir()) and not overwrite:
        raise OutputError(f"'{dst / 'images'}' already holds files; choose an empty dataset folder")
    masks_by_stem = {p.stem: p for p in _image_files((src / "masks").iterdir())}
    ensure_output_dir(dst / "images")
    ensure_output_dir(dst / "masks")
    for image_path in images:
        mask_path = masks_by_stem.get(image_path.stem)
        if mask_path is None:
            raise InputError(
                f"CLEVR source image '{image_path}' has no mask '{src / 'masks' / image_path.stem}.png'"
            )
        if mask_path.suffix.lower() in (".jpg", ".jpeg"):
            raise InputError(
                f"colour-coded mask '{mask_path}' is JPEG: instance colours need a lossless file (PNG)"
            )
        labels = _decode_colour_mask(mask_path, background, min_pixels)
        w, h = _image_size(image_path)
        if labels.shape != (h, w):
            raise InputError(
                f"mask '{mask_path}' is {labels.shape[1]}x{labels.shape[0]} but image '{image_path}' is {w}x{h}"
            )
        atomic_write_bytes(dst / "images" / image_path.name, image_path.read_bytes())
        atomic_save_image(
            Image.fromarray(labels.astype(np.uint8), mode="L"), dst / "masks" / f"{image_path.stem}.png"
        )
    return dst


def _decode_colour_mask(
    path: Path, background: str | int | tuple[int, int, int], min_pixels: int
) -> np.ndarray:
    """(H, W) int64 instance ids 0..K (0 = background) of a colour-coded mask."""
    im = _open(path, "colour-coded mask")
    if isinstance(background, tuple) or im.mode not in ({"P"} | _LABEL_MODES):
        rgb = np.asarray(im.convert("RGB")).astype(np.int64)  # (H, W, 3)
        codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]  # (H, W) one int per colour
        if isinstance(background, int):
            raise InputError(
                f"background {background} is an index but mask '{path}' is RGB-coded; give a colour like '0,0,0'"
            )
        bg = None if background == "auto" else (background[0] << 16) | (background[1] << 8) | background[2]
    else:
        codes = np.asarray(im).astype(np.int64)  # palette index / grey value
        bg = None if background == "auto" else int(background)
    if bg is None:
        border = np.concatenate([codes[0], codes[-1], codes[:, 0], codes[:, -1]])
        values, counts = np.unique(border, return_counts=True)
        bg = int(values[np.argmax(counts)])
    flat = codes.reshape(-1)
    values, first, counts = np.unique(flat, return_index=True, return_counts=True)
    is_instance = (values != bg) & (counts >= max(min_pixels, 1))
    if is_instance.sum() > _MAX_INSTANCES:
        raise InputError(
            f"mask '{path}' has {int(is_instance.sum())} colours besides the background: not a colour-coded instance "
            "map (lossy or antialiased?); raise min_pixels or use lossless masks"
        )
    if not is_instance.any():
        raise InputError(f"mask '{path}' has no instance: every pixel is the background colour")
    ids = np.zeros(len(values), dtype=np.int64)
    order = np.argsort(first[is_instance])  # instances numbered by first pixel in raster order
    ids[np.nonzero(is_instance)[0][order]] = np.arange(1, int(is_instance.sum()) + 1)
    return ids[np.searchsorted(values, flat)].reshape(codes.shape)


def _image_files(paths: Iterable[Path]) -> list[Path]:
    """Image files among ``paths`` in natural name order; two files with one stem are an error."""
    files = sorted(
        (p for p in paths if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
        key=lambda p: _natural(p.name),
    )
    seen: dict[str, Path] = {}
    for p in files:
        if p.stem in seen:
            raise InputError(f"two files share the name '{p.stem}': '{seen[p.stem]}' and '{p}'; keep one")
        seen[p.stem] = p
    return files


def _mask_path(masks_dir: Path, image: Path) -> Path:
    file, folder = masks_dir / f"{image.stem}.png", masks_dir / image.stem
    if file.is_file() and folder.is_dir():
        raise InputError(
            f"image '{image}' has both a label map '{file}' and a mask folder '{folder}'; keep one"
        )
    if file.is_file():
        return file
    if folder.is_dir():
        return folder
    raise InputError(f"image '{image}' has no ground truth: expected '{file}' or a folder '{folder}/'")


def _check_gt(sample: BenchSample, gt: np.ndarray, size_wh: tuple[int, int]) -> None:
    w, h = size_wh
    if gt.shape[1:] != (h, w):
        raise InputError(
            f"mask '{sample.mask_path}' is {gt.shape[2]}x{gt.shape[1]} but image '{sample.image_path}' is {w}x{h}"
        )
    if gt.shape[0] == 0:
        raise InputError(
            f"mask '{sample.mask_path}' holds no object (all background); remove the image or its mask"
        )


def _image_size(path: Path) -> tuple[int, int]:
    """(W, H) as displayed (EXIF orientations 5-8 swap the sides), read from the header only."""
    with _open(path, "image", load=False) as im:
        w, h = im.size
        try:
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
        except Exception:  # noqa: BLE001 - a malformed EXIF block means no rotation, as load_image treats it
            orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def _open(path: Path, what: str, *, load: bool = True) -> Image.Image:
    try:
        im = Image.open(path)
        if load:
            im.load()
            im = ImageOps.exif_transpose(im) if what == "image" else im
    except FileNotFoundError:
        raise InputError(f"{what} '{path}': no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(" ".join(f"{what} '{path}': cannot read ({e})".split())) from None
    return im


def _natural(name: str) -> list[int | str]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]
