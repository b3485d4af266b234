"""Known answers for the measuring helpers of `benchmarks/toy_quality.py` (the partition section's oracle)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from conceptexpress.toy import IMAGE_SIZE


@pytest.fixture(scope="module")
def toy_quality():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "toy_quality.py"
    spec = importlib.util.spec_from_file_location("toy_quality", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("object_columns, expected", [(24, 16 / 24), (27, 27 / 32)])
def test_pre_cluster_oracle_takes_the_pre_clusters_mostly_inside(toy_quality, object_columns, expected):
    """4×4 pre-clusters: column 0 → 0, column 1 → 1, columns 2-3 → 2 (16 px per latent column at 64 px). The object
    fills the left `object_columns` columns: with 24, pre-cluster 1 is half inside (not "mostly") and the oracle is
    column 0 alone; with 27, 11 of its 16 columns are inside and it joins."""
    pre = np.array([[0, 1, 2, 2]] * 4)
    gt = np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), bool)
    gt[0, :, :object_columns] = True
    assert toy_quality._pre_cluster_oracle(pre, gt) == [pytest.approx(expected)]


def test_pre_cluster_oracle_is_per_object(toy_quality):
    pre = np.array([[0, 0, 1, 1]] * 2 + [[2, 2, 3, 3]] * 2)  # four quadrants
    gt = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE), bool)
    gt[0, :32, :32] = True  # exactly quadrant 0
    gt[1, 32:, :] = True  # quadrants 2 and 3
    assert toy_quality._pre_cluster_oracle(pre, gt) == [pytest.approx(1.0), pytest.approx(1.0)]
