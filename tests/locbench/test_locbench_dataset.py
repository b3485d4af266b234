"""Benchmark datasets: synthetic scenes, the folder layout, CLEVR-style colour-mask conversion, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conceptexpress.errors import InputError, OutputError
from conceptexpress.locbench.dataset import (
    convert_clevr_masks,
    load_dataset,
    parse_background,
    read_instance_masks,
)
from conceptexpress.locbench.scenes import CLEVR_COLORS, make_scene, write_synthetic_dataset


def one_line_input_error(fn, match: str) -> str:
    with pytest.raises(InputError, match=match) as info:
        fn()
    message = str(info.value)
    assert "\n" not in message
    return message


# ----------------------------------------------------------------------------- scenes
@pytest.mark.parametrize("k", [1, 3, 8])
def test_make_scene_has_k_exact_non_overlapping_objects(k):
    image, labels = make_scene(k, size=(96, 64), k=k)
    assert image.size == (96, 64) and image.mode == "RGB"
    assert labels.shape == (64, 96) and labels.dtype == np.int32
    assert sorted(np.unique(labels).tolist()) == list(range(k + 1))
    pixels = np.asarray(image).astype(int)
    colours = []
    for i in range(1, k + 1):
        mean = pixels[labels == i].mean(0)
        colours.append(
            min(range(len(CLEVR_COLORS)), key=lambda c: np.abs(np.subtract(CLEVR_COLORS[c], mean)).sum())
        )
    assert len(set(colours)) == k  # distinct colours
    again_image, again = make_scene(k, size=(96, 64), k=k)
    assert (again == labels).all() and np.array_equal(np.asarray(again_image), pixels)


def test_make_scene_errors():
    with pytest.raises(ValueError, match="`k`"):
        make_scene(0, k=9)
    with pytest.raises(ValueError, match="`size`"):
        make_scene(0, size=(8, 8))


def test_write_synthetic_dataset_layout_and_refusal(tmp_path):
    folder = write_synthetic_dataset(tmp_path / "ds", 3, seed=1, size=(64, 64), objects=(2, 3))
    samples = load_dataset(folder)
    assert [s.name for s in samples] == ["scene_0000", "scene_0001", "scene_0002"]
    image, gt = samples[0].load()
    assert image.size == (64, 64) and gt.dtype == bool and 2 <= gt.shape[0] <= 3
    with pytest.raises(OutputError, match="already holds files"):
        write_synthetic_dataset(folder, 2)
    # A larger dataset starts with the same scenes.
    bigger = write_synthetic_dataset(tmp_path / "ds5", 5, seed=1, size=(64, 64), objects=(2, 3))
    assert (bigger / "masks" / "scene_0002.png").read_bytes() == (
        folder / "masks" / "scene_0002.png"
    ).read_bytes()


# ----------------------------------------------------------------------------- layout
def write_pair(root, name, labels, *, image_size=None, mode="L"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    h, w = labels.shape
    Image.new("RGB", image_size or (w, h), (200, 200, 200)).save(root / "images" / f"{name}.png")
    Image.fromarray(labels.astype(np.uint16 if mode.startswith("I") else np.uint8)).save(
        root / "masks" / f"{name}.png"
    )


def labels_3(h=40, w=48) -> np.ndarray:
    lab = np.zeros((h, w), dtype=np.int64)
    lab[2:12, 2:12], lab[20:30, 5:20], lab[5:15, 30:45] = 1, 7, 300 % 256  # ids need not be consecutive
    return lab


def test_label_map_8_and_16_bit(tmp_path):
    lab = labels_3()
    write_pair(tmp_path / "a", "x", lab)
    gt8 = read_instance_masks(tmp_path / "a" / "masks" / "x.png")
    assert gt8.shape == (3, 40, 48) and (gt8[1] == (lab == 7)).all()
    lab16 = lab.copy()
    lab16[lab == 7] = 4000
    (tmp_path / "b" / "masks").mkdir(parents=True)
    Image.fromarray(lab16.astype(np.uint16)).save(tmp_path / "b" / "masks" / "x.png")
    gt16 = read_instance_masks(tmp_path / "b" / "masks" / "x.png")
    assert gt16.shape == (3, 40, 48) and (gt16[2] == (lab16 == 4000)).all()


def test_per_instance_mask_folder_equals_label_map(tmp_path):
    lab = labels_3()
    write_pair(tmp_path, "x", lab)
    (tmp_path / "masks" / "x.png").unlink()
    folder = tmp_path / "masks" / "x"
    folder.mkdir()
    for i, v in enumerate([1, 7, 44], start=1):
        Image.fromarray(((lab == v) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(folder / "10.png")  # empty: skipped
    samples = load_dataset(tmp_path)
    _, gt = samples[0].load()
    assert gt.shape == (3, 40, 48)
    assert [(gt[i] == (lab == v)).all() for i, v in enumerate([1, 7, 44])] == [True, True, True]


# ----------------------------------------------------------------------------- CLEVR conversion
@pytest.mark.parametrize("coding", ["rgb", "palette"])
def test_clevr_colour_masks_round_trip(tmp_path, coding):
    image, labels = make_scene(5, size=(80, 64), k=4)
    src = tmp_path / "clevr"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    image.save(src / "images" / "CLEVR_0001.png")
    palette = [(64, 64, 64), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]  # index 0 = background
    if coding == "rgb":
        Image.fromarray(np.asarray(palette, np.uint8)[labels]).save(src / "masks" / "CLEVR_0001.png")
    else:
        mask = Image.fromarray(labels.astype(np.uint8), mode="P")
        mask.putpalette([c for rgb in palette for c in rgb])
        mask.save(src / "masks" / "CLEVR_0001.png")
    for background in ("auto", (64, 64, 64) if coding == "rgb" else 0):
        dst = convert_clevr_masks(src, tmp_path / f"ds-{background}", background=background)
        (sample,) = load_dataset(dst)
        loaded, gt = sample.load()
        expected = labels[None] == np.arange(1, 5)[:, None, None]
        # Instances are renumbered by first pixel: compare as sets of masks.
        assert sorted(m.tobytes() for m in gt) == sorted(m.tobytes() for m in expected)
        assert np.array_equal(np.asarray(loaded), np.asarray(image))


def test_clevr_conversion_errors(tmp_path):
    src = tmp_path / "clevr"
    (src / "images").mkdir(parents=True)
    (src / "masks").mkdir()
    Image.new("RGB", (40, 40)).save(src / "images" / "a.png")
    one_line_input_error(lambda: convert_clevr_masks(src, tmp_path / "d1"), "has no mask")
    Image.new("RGB", (40, 40), (9, 9, 9)).save(src / "masks" / "a.png")
    one_line_input_error(lambda: convert_clevr_masks(src, tmp_path / "d2"), "no instance")
    Image.new("RGB", (40, 30), (9, 9, 9)).save(src / "masks" / "a.png")
    one_line_input_error(lambda: convert_clevr_masks(src, tmp_path / "d3", background=(0, 0, 0)), "40x30")
    assert parse_background("auto") == "auto" and parse_background("3") == 3
    assert parse_background("0,0,255") == (0, 0, 255) and parse_background("#ff0000") == (255, 0, 0)
    one_line_input_error(lambda: parse_background("red"), "background")


# ----------------------------------------------------------------------------- errors
def test_bad_datasets_raise_one_line_input_errors(tmp_path):
    one_line_input_error(lambda: load_dataset(tmp_path / "nope"), "does not exist")
    (tmp_path / "empty" / "images").mkdir(parents=True)
    one_line_input_error(lambda: load_dataset(tmp_path / "empty"), "is empty")
    one_line_input_error(lambda: load_dataset(tmp_path), "no images/ folder")

    lab = labels_3()
    write_pair(tmp_path / "missing", "x", lab)
    (tmp_path / "missing" / "masks" / "x.png").unlink()
    one_line_input_error(lambda: load_dataset(tmp_path / "missing"), "no ground truth")

    write_pair(tmp_path / "size", "x", lab, image_size=(50, 40))
    one_line_input_error(lambda: load_dataset(tmp_path / "size"), "48x40 but image .* is 50x40")

    write_pair(tmp_path / "blank", "x", np.zeros((40, 48), np.int64))
    one_line_input_error(lambda: load_dataset(tmp_path / "blank"), "holds no object")

    write_pair(tmp_path / "rgb", "x", lab)
    Image.new("RGB", (48, 40)).save(tmp_path / "rgb" / "masks" / "x.png")
    one_line_input_error(lambda: load_dataset(tmp_path / "rgb"), "mode RGB")

    write_pair(tmp_path / "dup", "x", lab)
    Image.new("RGB", (48, 40)).save(tmp_path / "dup" / "images" / "x.jpg")
    one_line_input_error(lambda: load_dataset(tmp_path / "dup"), "share the name")

    write_pair(tmp_path / "broken", "x", lab)
    (tmp_path / "broken" / "masks" / "x.png").write_bytes(b"not a png")
    one_line_input_error(lambda: load_dataset(tmp_path / "broken"), "cannot read")


def test_limit_and_natural_order(tmp_path):
    for name in ("s10", "s2", "s1"):
        write_pair(tmp_path, name, labels_3())
    assert [s.name for s in load_dataset(tmp_path)] == ["s1", "s2", "s10"]
    assert [s.name for s in load_dataset(tmp_path, limit=2)] == ["s1", "s2"]
