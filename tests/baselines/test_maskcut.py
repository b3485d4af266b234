"""MaskCut (paper Table 3 "MC"): normalized cut with known answers, iterative masking, the DINO adapter on a tiny
random ViT saved to disk, and the bench-localize row."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from conceptexpress.baselines.maskcut import MaskCut, affinity_graph, maskcut_masks, normalized_cut
from conceptexpress.errors import ConfigError, ModelLoadError
from conceptexpress.locbench.report import format_table
from conceptexpress.locbench.run import BenchConfig, bench_localize
from conceptexpress.locbench.scenes import write_synthetic_dataset


def features_of(labels: np.ndarray) -> np.ndarray:
    """(h·w, K) one-hot features: patches with equal labels have identical features, others cosine 0."""
    return np.eye(int(labels.max()) + 1)[labels.reshape(-1)]


# ----------------------------------------------------------------------------- pure functions
def test_affinity_graph_thresholds_cosine_and_isolates_zero_rows():
    f = np.array([[1.0, 0.0], [2.0, 0.2], [0.0, 1.0], [0.0, 0.0]])
    w = affinity_graph(f, tau=0.15, eps=1e-5)
    assert w.shape == (4, 4) and np.array_equal(w, w.T)
    assert w[0, 1] == 1.0 and w[0, 2] == 1e-5  # cos 0.995 > tau; cos 0 is not
    assert np.all(w[3] == 1e-5)  # a zeroed (masked-out) patch keeps only eps edges, itself included
    assert affinity_graph(f, tau=0.999)[0, 1] == 1e-5  # strict: cos 0.995 is below 0.999


def test_two_groups_of_identical_features_split_exactly():
    labels = np.zeros((6, 6), dtype=int)
    labels[2:4, 1:4] = 1  # 6 patches inside 30 of background, touching no corner
    cut = normalized_cut(features_of(labels), (6, 6))
    assert np.array_equal(cut.foreground.reshape(6, 6), labels == 1)
    assert not cut.flipped and cut.foreground[cut.seed]  # seed rule: the smaller group has the largest |y|
    assert len(np.unique(np.round(cut.eigenvector, 9))) == 2  # piecewise constant on the two groups
    assert 0.0 <= cut.eigenvalue < 1e-3  # the groups are joined by eps edges only: an almost free cut
    d = affinity_graph(features_of(labels)).sum(axis=1)
    assert np.isclose(np.sum(d * cut.eigenvector**2), 1.0) and abs(np.sum(d * cut.eigenvector)) < 1e-9


def test_foreground_does_not_depend_on_which_group_is_labelled_first():
    labels = np.zeros((6, 6), dtype=int)
    labels[2:4, 1:4] = 1
    swapped = normalized_cut(features_of(1 - labels), (6, 6))
    assert np.array_equal(swapped.foreground.reshape(6, 6), labels == 1)


def test_corner_rule_flips_a_foreground_with_three_corners():
    labels = np.zeros((6, 6), dtype=int)
    labels[0, :] = 1
    labels[:, 0] = 1  # the smaller group is an L holding 3 corners (top-left, top-right, bottom-left)
    f = features_of(labels)
    cut = normalized_cut(f, (6, 6))
    assert cut.partition[cut.seed] == cut.partition[0]  # the seed lies on the L's side ...
    assert cut.flipped and np.array_equal(cut.foreground.reshape(6, 6), labels == 0)  # ... which is flipped
    kept = normalized_cut(f, (6, 6), max_corners=3)
    assert not kept.flipped and np.array_equal(kept.foreground.reshape(6, 6), labels == 1)


def test_two_corners_are_allowed_as_cutler():
    labels = np.zeros((6, 6), dtype=int)
    labels[0, :] = 1  # top row: 2 corners
    cut = normalized_cut(features_of(labels), (6, 6))
    assert not cut.flipped and np.array_equal(cut.foreground.reshape(6, 6), labels == 1)
    strict = normalized_cut(features_of(labels), (6, 6), max_corners=1)
    assert strict.flipped and np.array_equal(strict.foreground.reshape(6, 6), labels == 0)


def test_connected_component_of_the_seed():
    labels = np.zeros((8, 8), dtype=int)
    labels[1:3, 1:3] = 1
    labels[5:7, 4:7] = 1  # one feature, two separate regions
    f = features_of(labels)
    whole = normalized_cut(f, (8, 8), connected=False)
    assert np.array_equal(whole.foreground.reshape(8, 8), labels == 1)
    part = normalized_cut(f, (8, 8)).foreground.reshape(8, 8)
    first = np.zeros((8, 8), dtype=bool)
    first[1:3, 1:3] = True  # equal |y| everywhere on the group: the first patch in raster order decides
    assert np.array_equal(part, first)


def three_objects() -> np.ndarray:
    labels = np.zeros((8, 8), dtype=int)
    labels[1:3, 1:3] = 1
    labels[5:7, 1:4] = 2
    labels[2:6, 5:7] = 3
    return labels


def test_iterative_masking_finds_disjoint_objects_up_to_n():
    labels = three_objects()
    result = maskcut_masks(features_of(labels), (8, 8))  # CutLER's N = 3
    assert result.masks.shape == (3, 8, 8) and result.masks.dtype == bool
    assert result.masks.sum(axis=0).max() == 1  # pairwise disjoint
    found = sorted(tuple(np.unique(labels[m])) for m in result.masks)
    assert found == [(1,), (2,), (3,)]  # each mask is exactly one object
    assert result.messages == ()

    assert maskcut_masks(features_of(labels), (8, 8), 1).masks.shape[0] == 1
    two = maskcut_masks(features_of(labels), (8, 8), 2)
    assert np.array_equal(two.masks, result.masks[:2])

    more = maskcut_masks(features_of(labels), (8, 8), 5)
    assert np.array_equal(more.masks, result.masks)  # a 4th cut only finds the taken region again
    assert len(more.cuts) == 4 and "stopped at round 4" in more.messages[0]

    # Without CutLER's two filters, the 4th cut is caught by the last rule: it adds no untaken patch.
    unfiltered = maskcut_masks(features_of(labels), (8, 8), 5, min_area=0.0, max_iou=1.0)
    assert np.array_equal(unfiltered.masks, result.masks) and "adds no untaken patch" in unfiltered.messages[0]


def test_maskcut_masks_rejects_bad_arguments():
    f = features_of(three_objects())
    with pytest.raises(ValueError, match="num_masks"):
        maskcut_masks(f, (8, 8), 0)
    with pytest.raises(ValueError, match="grid"):
        normalized_cut(f, (4, 8))
    with pytest.raises(ValueError, match="max_corners"):
        normalized_cut(f, (8, 8), max_corners=5)


# ----------------------------------------------------------------------------- DINO adapter on a tiny ViT
@pytest.fixture(scope="module")
def tiny_dino8(tmp_path_factory):
    """Random ViTModel shaped like facebook/dino-vits8 at toy size, written like a downloaded checkpoint."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(
        patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32,
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-dino8")
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scene():
    from conceptexpress.locbench.scenes import make_scene

    image, _ = make_scene(0, (96, 80), 3)
    return image


def test_features_are_the_last_layers_keys(tiny_dino8, scene, one_torch_thread):
    mc = MaskCut(str(tiny_dino8), resolution=48)
    keys, grid = mc.features(scene)
    assert grid == (6, 6) and keys.shape == (36, 32) and keys.dtype == torch.float32

    # The same keys by hand: last layer's pre-attention norm and key projection on its input hidden state.
    model = mc._model
    layer = (model.layers if hasattr(model, "layers") else model.encoder.layer)[-1]
    attn = layer.attention
    key = attn.k_proj if hasattr(attn, "k_proj") else attn.attention.key
    rgb = np.asarray(scene.convert("RGB").resize((48, 48), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    x = (torch.from_numpy(rgb).permute(2, 0, 1) - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
        [0.229, 0.224, 0.225]
    )[:, None, None]
    with torch.no_grad():
        out = model(pixel_values=x[None], interpolate_pos_encoding=True, output_hidden_states=True)
        expected = key(layer.layernorm_before(out.hidden_states[-2]))[0, 1:]
    torch.testing.assert_close(keys, expected)


def test_maskcut_on_tiny_vit_gives_disjoint_masks(tiny_dino8, scene, one_torch_thread):
    result = MaskCut(str(tiny_dino8), resolution=64)(scene)
    assert result.grid == (8, 8)
    assert 1 <= result.masks.shape[0] <= 3 and result.masks.shape[1:] == (8, 8)
    assert result.masks.sum(axis=0).max() <= 1 and all(m.any() for m in result.masks)


def test_maskcut_load_errors(tiny_dino8, tmp_path):
    with pytest.raises(ConfigError, match="multiple of the ViT's patch size 8"):
        MaskCut(str(tiny_dino8), resolution=60).load()
    with pytest.raises(ModelLoadError, match="no such folder"):
        MaskCut(str(tmp_path / "missing")).load()


def test_maskcut_module_does_not_import_transformers(heavy_imports):
    assert "transformers" not in heavy_imports["conceptexpress.baselines.maskcut"]


# ----------------------------------------------------------------------------- bench-localize row
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(tmp_path_factory.mktemp("scenes"), 2, seed=0, size=(96, 96), objects=(2, 3))


def test_bench_localize_maskcut_row(tiny_pipe, tiny_dino8, dataset, tmp_path, one_torch_thread):
    config = BenchConfig(
        ks=(2,), kmeans_n_init=1, figure_rows=0, cache=False, maskcut=True, maskcut_model=str(tiny_dino8),
        maskcut_resolution=64,
    )
    results = bench_localize(dataset, config, pipe=tiny_pipe, out_dir=tmp_path / "a", progress=False)
    assert results["methods"] == ["kmeans@2", "finch@2", "ours", "maskcut"]
    assert 0.0 <= results["summary"]["maskcut"]["iou"] <= 1.0 and "maskcut" in results["definitions"]
    assert results["config"]["BenchConfig"]["maskcut_model"] == str(tiny_dino8)
    for image in results["images"]:
        assert image["methods"]["maskcut"]["num_pred"] <= 3
    table = (tmp_path / "a" / "table.md").read_text()
    assert "| Method | k-means | FINCH | Ours | MC |" in table and "| #clust | 2 | 2 | auto | ≤3 |" in table

    given = BenchConfig(**{**vars(config), "ks": (2,), "maskcut_masks": 0})
    results = bench_localize(dataset, given, pipe=tiny_pipe, out_dir=tmp_path / "b", progress=False)
    for image in results["images"]:
        assert image["methods"]["maskcut"]["num_pred"] <= image["num_gt"]
    assert "| auto | given |" in (tmp_path / "b" / "table.md").read_text()


def test_maskcut_is_not_loaded_unless_asked(tiny_pipe, dataset, tmp_path, monkeypatch, one_torch_thread):
    def refuse(self):
        raise AssertionError("MaskCut loaded without --maskcut")

    monkeypatch.setattr(MaskCut, "load", refuse)
    config = BenchConfig(ks=(2,), kmeans_n_init=1, limit=1, figure_rows=0, cache=False)
    results = bench_localize(dataset, config, pipe=tiny_pipe, out_dir=tmp_path, progress=False)
    assert "maskcut" not in results["methods"] and "maskcut" not in results["definitions"]


def test_table_mc_column_takes_no_mark():
    methods = ["kmeans@2", "finch@2", "ours", "maskcut"]
    summary = {m: {"iou": v, "recall": 0.5, "precision": 0.5} for m, v in zip(methods, [0.1, 0.3, 0.2, 0.9])}
    summary["ours"].update(num_images=1, num_gt=3, mean_num_pred=2.0)
    summary["maskcut"]["mean_num_pred"] = 3.0
    table = format_table(summary, (2,), maskcut_clust="≤3")
    row = next(line for line in table.splitlines() if line.startswith("| IoU"))
    assert row == "| IoU | 10.0 | **30.0** | <u>20.0</u> | 90.0 |"
    assert "MC: MaskCut" in table and "3.00 masks per image" in table


def test_cli_flags_reach_bench_config():
    from conceptexpress.cli import config_from_args
    from conceptexpress.cli.bench_localize import add_parser as add_bench_localize_parser

    parser = argparse.ArgumentParser()
    add_bench_localize_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["bench-localize", "ds", "--maskcut", "--maskcut-model", "m", "--maskcut-masks", "0", "--maskcut-tau", "0.2"]
    )
    config = config_from_args(args, BenchConfig)
    assert (config.maskcut, config.maskcut_model, config.maskcut_masks, config.maskcut_tau) == (True, "m", 0, 0.2)
    assert config.maskcut_clust == "given"
    default = BenchConfig()
    assert not default.maskcut and default.maskcut_model == "facebook/dino-vits8" and default.maskcut_clust is None
    assert (default.maskcut_resolution, default.maskcut_tau, default.maskcut_masks) == (480, 0.15, 3)
    for bad in ({"maskcut_masks": -1}, {"maskcut_resolution": 0}, {"maskcut_tau": 1.0}):
        with pytest.raises(ConfigError):
            BenchConfig(**bad)
