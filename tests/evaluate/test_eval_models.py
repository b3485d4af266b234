"""Evaluation models on tiny random weights: CLIP / DINO encoders, SAM masker, point sampling, masked images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conceptexpress.errors import ModelLoadError
from conceptexpress.evaluate.encoders import ClipImageEncoder, DinoImageEncoder, ImageEncoder, build_encoder
from conceptexpress.evaluate.sam import (
    SamMasker,
    bounding_box,
    masked_concept_image,
    sample_mask_points,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="session")
def tiny_eval_models(tmp_path_factory):
    from conceptexpress.evaluate.testing import save_tiny_eval_models

    return save_tiny_eval_models(tmp_path_factory.mktemp("tiny-eval"))


def _photos() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    return [Image.new("RGB", (48, 48), (200, 30, 30)), noise, Image.new("L", (30, 70), 128)]


@pytest.mark.parametrize("cls", [ClipImageEncoder, DinoImageEncoder])
def test_encoders_give_normalized_deterministic_features(cls, tiny_eval_models):
    enc = cls(str(tiny_eval_models[cls.name]))
    assert isinstance(enc, ImageEncoder)
    feats = enc.encode(_photos())
    width = 16 if cls.name == "clip" else 32  # tiny projection dim / ViT width
    assert feats.shape == (3, width) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert torch.allclose(feats.norm(dim=1), torch.ones(3), atol=1e-5)
    again = cls(str(tiny_eval_models[cls.name]), batch_size=1).encode(_photos())
    assert torch.allclose(feats, again, atol=1e-5)  # same weights, other instance and batch size
    assert type(enc._processor).__name__.endswith("Pil")  # no torchvision needed


def test_build_encoder_and_unknown_names(tiny_eval_models):
    assert isinstance(build_encoder("dino", str(tiny_eval_models["dino"])), DinoImageEncoder)
    assert build_encoder("clip").model_id == "openai/clip-vit-base-patch32"
    with pytest.raises(Exception, match="unknown encoder 'siglip'"):
        build_encoder("siglip")


@pytest.mark.parametrize("make", [lambda p: ClipImageEncoder(p), lambda p: DinoImageEncoder(p), lambda p: SamMasker(p)])
def test_missing_or_broken_model_is_one_line_model_load_error(make, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ModelLoadError) as info:
        make(missing).check()
    msg = str(info.value)
    assert "\n" not in msg and missing in msg and "hub id" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    model = make(str(empty))
    with pytest.raises(ModelLoadError) as info:
        model.encode(_photos()) if hasattr(model, "encode") else model.load()
    assert "\n" not in str(info.value) and "could not load" in str(info.value)


def _ring_mask(h: int = 40, w: int = 56) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[5:20, 30:50] = True
    return mask


def test_points_are_inside_the_mask_distinct_and_seeded():
    mask = _ring_mask()
    pts = sample_mask_points(mask, 3, seed=7)
    assert pts.shape == (3, 2)
    xs, ys = pts[:, 0], pts[:, 1]
    assert np.all(mask[ys.astype(int), xs.astype(int)])  # pixel centres of mask pixels
    assert np.all((xs % 1 == 0.5) & (ys % 1 == 0.5))
    assert len({tuple(p) for p in pts}) == 3
    assert np.array_equal(pts, sample_mask_points(mask, 3, seed=7))
    assert not np.array_equal(pts, sample_mask_points(mask, 3, seed=8))
    tiny = np.zeros((4, 4), bool)
    tiny[1, 2] = True
    assert sample_mask_points(tiny, 3, seed=0).tolist() == [[2.5, 1.5]]  # fewer pixels than points: all of them
    with pytest.raises(ValueError, match="empty"):
        sample_mask_points(np.zeros((4, 4), bool))


def test_sam_masker_returns_a_bool_mask_of_the_image_size(tiny_eval_models):
    image = _photos()[1]  # 56 x 40, not square
    sam = SamMasker(str(tiny_eval_models["sam"]))
    mask = sam.mask_from_points(image, _ring_mask(), n_points=3, seed=0)
    assert mask.shape == (40, 56) and mask.dtype == bool
    preds = sam.masks_from_points(image, [_ring_mask(), ~_ring_mask()], n_points=3, seed=0)
    assert len(preds) == 2
    assert np.array_equal(preds[0].mask, mask)  # same seed, same points, same answer; order-independent
    assert np.array_equal(preds[0].points, sample_mask_points(_ring_mask(), 3, 0))
    assert all(isinstance(p.score, float) for p in preds)
    with pytest.raises(ValueError, match="shape"):
        sam.masks_from_points(image, [np.ones((10, 10), bool)])


def test_masked_concept_image_blacks_out_the_rest_and_crops_to_a_square():
    rng = np.random.default_rng(1)
    pixels = rng.integers(1, 256, (40, 56, 3), dtype=np.uint8)  # no black pixel of its own
    image = Image.fromarray(pixels)
    mask = _ring_mask()
    full = np.asarray(masked_concept_image(image, mask, crop=False))
    assert full.shape == (40, 56, 3)
    assert np.array_equal(full[mask], pixels[mask]) and not full[~mask].any()
    assert bounding_box(mask) == (30, 5, 50, 20)
    cropped = np.asarray(masked_concept_image(image, mask, crop=True))
    assert cropped.shape == (20, 20, 3)  # box 20 x 15 padded to 20 x 20, centred: 2 rows above, 3 below
    assert np.array_equal(cropped[2:17], pixels[5:20, 30:50]) and not cropped[:2].any() and not cropped[17:].any()
    black = np.asarray(masked_concept_image(image, np.zeros((40, 56), bool), crop=True))
    assert black.shape == (40, 56, 3) and not black.any()
