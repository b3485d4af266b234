"""Hungarian IoU matching and the IoU / Recall / Precision definitions of the localization benchmark (§4.5)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from conceptexpress.locbench.matching import aggregate, iou_matrix, match_masks

H, W = 20, 40


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


# Three disjoint ground-truth objects of 100 pixels each.
GT = np.stack([box(0, 10, 0, 10), box(0, 10, 20, 30), box(10, 20, 10, 20)])


def test_perfect_prediction_in_any_order():
    pred = GT[[2, 0, 1]]
    m = match_masks(pred, GT)
    assert (m.iou, m.recall, m.precision, m.iou_matched) == (1.0, 1.0, 1.0, 1.0)
    assert m.pairs.tolist() == [[1, 0], [2, 1], [0, 2]]  # (pred, gt) in ground-truth order
    assert m.true_positives == 3


def test_one_missed_object_counts_zero_in_iou():
    m = match_masks(GT[:2], GT)
    assert m.iou == pytest.approx(2 / 3)
    assert m.iou_matched == 1.0
    assert m.recall == pytest.approx(2 / 3)
    assert m.precision == 1.0


def test_split_object():
    # Object 0 cut into 60 + 40 pixels; the larger part is matched (IoU 0.6), the smaller one is a false positive.
    pred = np.stack([box(0, 6, 0, 10), box(6, 10, 0, 10), GT[1], GT[2]])
    m = match_masks(pred, GT)
    assert m.pairs.tolist() == [[0, 0], [2, 1], [3, 2]]
    assert m.iou == pytest.approx((0.6 + 1 + 1) / 3)
    assert m.recall == 1.0
    assert m.precision == pytest.approx(3 / 4)
    strict = match_masks(pred, GT, iou_threshold=0.7)
    assert strict.recall == pytest.approx(2 / 3) and strict.precision == pytest.approx(2 / 4)


def test_extra_false_positive():
    pred = np.concatenate([GT, box(12, 20, 30, 40)[None]])  # a mask on the background
    m = match_masks(pred, GT)
    assert (m.iou, m.recall) == (1.0, 1.0)
    assert m.precision == pytest.approx(3 / 4)


def test_empty_prediction():
    m = match_masks(np.zeros((0, H, W), dtype=bool), GT)
    assert (m.iou, m.recall, m.precision) == (
        0.0,
        0.0,
        0.0,
    )  # precision of an empty prediction is 0 by definition
    assert m.iou_matched is None
    assert m.pairs.shape == (0, 2)
    assert m.to_dict()["pairs"] == []


def test_zero_iou_assignment_is_not_a_match():
    pred = box(12, 20, 30, 40)[None]  # touches no object, but Hungarian still assigns it somewhere
    m = match_masks(pred, GT)
    assert m.pairs.shape == (0, 2) and m.iou == 0.0 and m.precision == 0.0


def test_threshold_is_inclusive():
    pred = box(0, 5, 0, 10)[None]  # IoU exactly 0.5 with object 0
    assert match_masks(pred, GT).true_positives == 1
    assert match_masks(pred, GT, iou_threshold=0.51).true_positives == 0


def test_hungarian_maximizes_total_iou_not_greedy():
    # Greedy takes the largest IoU first, pred 0-gt 0 (0.667), leaving pred 1-gt 1 (0): total 0.667.
    # The optimum pairs pred 1-gt 0 (0.6) and pred 0-gt 1 (0.111): total 0.711.
    gt = np.stack([box(0, 10, 0, 10), box(0, 10, 10, 20)])
    pred = np.stack([box(0, 10, 2, 12), box(0, 10, 0, 6)])
    ious = iou_matrix(pred, gt)
    assert ious[0, 0] > ious[1, 0] > 0 and ious[1, 1] == 0
    m = match_masks(pred, gt)
    assert m.pairs.tolist() == [[1, 0], [0, 1]]


@pytest.mark.parametrize("seed", range(5))
def test_total_iou_equals_brute_force_optimum(seed):
    rng = np.random.default_rng(seed)
    pred = rng.random((4, 8, 8)) < 0.3
    gt = rng.random((3, 8, 8)) < 0.3
    ious = iou_matrix(pred, gt)
    best = max(
        sum(ious[p, g] for p, g in zip(perm, range(3))) for perm in itertools.permutations(range(4), 3)
    )
    assert match_masks(pred, gt).iou * 3 == pytest.approx(best)


def test_iou_matrix_values():
    ious = iou_matrix(np.stack([box(0, 10, 0, 20), np.zeros((H, W), bool)]), GT)
    assert ious[0].tolist() == pytest.approx([0.5, 0.0, 0.0])
    assert ious[1].tolist() == [0.0, 0.0, 0.0]  # an empty mask matches nothing


def test_aggregate_micro_over_objects_and_macro_over_images():
    found = match_masks(GT, GT)  # 3 objects, all found
    missed = match_masks(np.zeros((0, H, W), bool), GT[:1])  # 1 object, nothing predicted
    s = aggregate([found, missed])
    assert (s.num_images, s.num_gt, s.num_pred, s.true_positives) == (2, 4, 3, 3)
    assert s.iou == pytest.approx(3 / 4) and s.recall == pytest.approx(3 / 4)
    assert s.precision == 1.0  # micro: 3 TP / 3 predicted masks
    assert s.macro_recall == pytest.approx(0.5) and s.macro_precision == pytest.approx(0.5)
    assert s.iou_matched == 1.0
    assert s.mean_num_pred == 1.5
    assert aggregate([missed]).precision == 0.0 and aggregate([missed]).iou_matched is None


def test_errors():
    with pytest.raises(ValueError, match="same"):
        match_masks(np.zeros((1, 5, 5), bool), GT)
    with pytest.raises(ValueError, match="G = 0"):
        match_masks(GT, np.zeros((0, H, W), bool))
    with pytest.raises(ValueError, match="iou_threshold"):
        match_masks(GT, GT, iou_threshold=0.0)
    with pytest.raises(ValueError, match="empty"):
        aggregate([])
