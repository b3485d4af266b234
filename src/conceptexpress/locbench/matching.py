"""Scoring predicted concept masks against ground-truth objects (paper §4.5, Table 3): Hungarian matching on IoU.

Pure numpy/scipy. The paper's Appendix B, which defines its metrics, is not available; the definitions used here
are stated below and in ``docs/localization-benchmark.md``.

Per image, with P predicted masks and G ground-truth objects at the source image's resolution:

- **IoU matrix**: ``IoU[p, g] = |pred_p ∩ gt_g| / |pred_p ∪ gt_g|`` (0 when both masks are empty).
- **Matching**: one-to-one, maximizing the *total* IoU (``scipy.optimize.linear_sum_assignment``, Hungarian
  algorithm). Assigned pairs whose IoU is 0 share no pixel and are dropped: they are not matches.
- **IoU** (the headline number): mean over the G ground-truth objects of the IoU with the matched prediction,
  an unmatched object counting 0. A method that finds one object perfectly and misses three scores 25, not 100.
  The mean over matched pairs only is kept as ``iou_matched`` (it isolates segmentation quality from misses).
- **True positives** (TP): matched pairs with ``IoU >= iou_threshold`` (0.5 by default).
- **Recall** = TP / G: the fraction of objects found.
- **Precision** = TP / P: the fraction of predicted masks that are a found object; defined as **0** when P = 0
  (an empty prediction has found nothing; 0 rather than NaN so that per-image averages penalize it instead of
  silently skipping the image).

Over a dataset (:func:`aggregate`), the headline numbers are **micro** averages over objects and masks:
IoU = Σ matched IoU / Σ G, Recall = Σ TP / Σ G, Precision = Σ TP / Σ P (0 when Σ P = 0). **Macro** averages
(the mean of the per-image values) are reported beside them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["DatasetScores", "ImageMatch", "aggregate", "iou_matrix", "match_masks"]


def iou_matrix(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(P, G) float64 IoU between every predicted and every ground-truth mask.

    Args:
        pred: (P, H, W) masks, any dtype (non-zero = inside).
        gt: (G, H, W) masks, same H, W.

    Returns:
        ``IoU[p, g]`` in [0, 1]; 0 where the union is empty.
    """
    pred, gt = _as_masks(pred, "pred"), _as_masks(gt, "gt")
    if pred.shape[1:] != gt.shape[1:]:
        raise ValueError(
            f"`pred` and `gt` must have the same (H, W); got {pred.shape[1:]} and {gt.shape[1:]} "
            "(upsample predictions to the source image's size first)"
        )
    hw = pred.shape[1] * pred.shape[2]
    p = pred.reshape(pred.shape[0], hw).astype(np.float64)  # (P, H·W); float64 counts are exact
    g = gt.reshape(gt.shape[0], hw).astype(np.float64)  # (G, H·W)
    inter = p @ g.T  # (P, G)
    union = p.sum(1)[:, None] + g.sum(1)[None, :] - inter  # (P, G)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


@dataclass(frozen=True)
class ImageMatch:
    """Hungarian matching of one image's predictions to its ground truth (definitions: module docstring).

    Attributes:
        ious: (P, G) float64 IoU matrix.
        pairs: (M, 2) int64 matched (prediction index, ground-truth index), ground-truth order; IoU > 0.
        pair_ious: (M,) float64 IoU of each matched pair.
        num_pred: P.
        num_gt: G (>= 1).
        iou_threshold: IoU a pair needs to count as a true positive.
    """

    ious: np.ndarray
    pairs: np.ndarray
    pair_ious: np.ndarray
    num_pred: int
    num_gt: int
    iou_threshold: float

    @property
    def true_positives(self) -> int:
        """Matched pairs with IoU >= ``iou_threshold``."""
        return int((self.pair_ious >= self.iou_threshold).sum())

    @property
    def iou_sum(self) -> float:
        """Σ IoU over matched pairs (unmatched objects add 0)."""
        return float(self.pair_ious.sum())

    @property
    def iou(self) -> float:
        """Mean IoU over ground-truth objects, an unmatched object counting 0."""
        return self.iou_sum / self.num_gt

    @property
    def iou_matched(self) -> float | None:
        """Mean IoU over matched pairs only; None when nothing matched."""
        return float(self.pair_ious.mean()) if len(self.pair_ious) else None

    @property
    def recall(self) -> float:
        """TP / G."""
        return self.true_positives / self.num_gt

    @property
    def precision(self) -> float:
        """TP / P, and 0 when P = 0."""
        return self.true_positives / self.num_pred if self.num_pred else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no NaN: ``iou_matched`` is null when nothing matched)."""
        return {
            "num_pred": self.num_pred,
            "num_gt": self.num_gt,
            "true_positives": self.true_positives,
            "iou": self.iou,
            "recall": self.recall,
            "precision": self.precision,
            "iou_matched": self.iou_matched,
            "pairs": [[int(p), int(g), float(v)] for (p, g), v in zip(self.pairs, self.pair_ious)],
        }


def match_masks(pred: np.ndarray, gt: np.ndarray, iou_threshold: float = 0.5) -> ImageMatch:
    """Match predicted masks to ground-truth objects one-to-one, maximizing the total IoU.

    Args:
        pred: (P, H, W) bool predicted masks at the source image's resolution; P may be 0.
        gt: (G, H, W) bool ground-truth instance masks, G >= 1.
        iou_threshold: IoU a matched pair needs to be a true positive, in (0, 1].

    Returns:
        An :class:`ImageMatch`; its properties give IoU, Recall, Precision as defined in the module docstring.

    Raises:
        ValueError: shapes disagree, G = 0, or the threshold is outside (0, 1].
    """
    if not 0.0 < float(iou_threshold) <= 1.0:
        raise ValueError(f"`iou_threshold` must be in (0, 1], got {iou_threshold!r}")
    ious = iou_matrix(pred, gt)  # (P, G)
    num_pred, num_gt = ious.shape
    if num_gt == 0:
        raise ValueError("`gt` holds no object (G = 0); recall and IoU are undefined for such an image")
    rows, cols = linear_sum_assignment(ious, maximize=True)  # min(P, G) pairs
    keep = ious[rows, cols] > 0  # a zero-IoU assignment shares no pixel: not a match
    order = np.argsort(cols[keep], kind="stable")
    pairs = np.stack([rows[keep][order], cols[keep][order]], axis=1).astype(np.int64).reshape(-1, 2)
    return ImageMatch(
        ious=ious,
        pairs=pairs,
        pair_ious=ious[pairs[:, 0], pairs[:, 1]],
        num_pred=int(num_pred),
        num_gt=int(num_gt),
        iou_threshold=float(iou_threshold),
    )


@dataclass(frozen=True)
class DatasetScores:
    """Scores of one method over a dataset; fractions in [0, 1] (the table shows them in %).

    ``iou``, ``recall``, ``precision`` are micro averages over objects / masks (the headline numbers);
    ``macro_*`` are means of the per-image values; ``iou_matched`` is Σ pair IoU / Σ matched pairs (None when
    nothing matched anywhere); ``mean_num_pred`` is the mean number of predicted masks per image.
    """

    iou: float
    recall: float
    precision: float
    iou_matched: float | None
    macro_iou: float
    macro_recall: float
    macro_precision: float
    num_images: int
    num_gt: int
    num_pred: int
    true_positives: int
    mean_num_pred: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def aggregate(matches: Sequence[ImageMatch]) -> DatasetScores:
    """Micro (over objects) and macro (over images) averages of per-image matches.

    Raises:
        ValueError: ``matches`` is empty.
    """
    if not matches:
        raise ValueError("`matches` is empty: nothing to aggregate")
    num_gt = sum(m.num_gt for m in matches)
    num_pred = sum(m.num_pred for m in matches)
    tp = sum(m.true_positives for m in matches)
    pairs = sum(len(m.pair_ious) for m in matches)
    iou_sum = sum(m.iou_sum for m in matches)
    n = len(matches)
    return DatasetScores(
        iou=iou_sum / num_gt,
        recall=tp / num_gt,
        precision=tp / num_pred if num_pred else 0.0,
        iou_matched=iou_sum / pairs if pairs else None,
        macro_iou=sum(m.iou for m in matches) / n,
        macro_recall=sum(m.recall for m in matches) / n,
        macro_precision=sum(m.precision for m in matches) / n,
        num_images=n,
        num_gt=num_gt,
        num_pred=num_pred,
        true_positives=tp,
        mean_num_pred=num_pred / n,
    )


def _as_masks(masks: np.ndarray, name: str) -> np.ndarray:
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ValueError(f"`{name}` must be a (N, H, W) stack of masks, got shape {masks.shape}")
    return masks.astype(bool, copy=False)
