"""Table rows of `evaluate`: methods, and ConceptExpress ablations as their own rows (paper Table 2)."""

from __future__ import annotations

import pytest

from conceptexpress.evaluate.report import method_name, method_order
from conceptexpress.evaluate.runs import method_label


def _manifest(method="conceptexpress", **train):
    cfg = {"split_merge": True, "attn_reg": True, "contrastive": True, **train}
    return {"method": method, "config": {"TrainConfig": cfg}}


@pytest.mark.parametrize(
    "manifest, label",
    [
        (_manifest(), "conceptexpress"),
        (_manifest(split_merge=False, attn_reg=False), "conceptexpress -SnM -Reg"),  # Table 2 row (0)
        (_manifest(attn_reg=False), "conceptexpress -Reg"),  # row (1)
        (_manifest(split_merge=False, contrastive=False), "conceptexpress -SnM"),  # row (2); -Con implied
        (_manifest(contrastive=False), "conceptexpress -Con"),
        (_manifest("bas-dagger", split_merge=False, contrastive=False), "bas-dagger"),
        ({"tokens": []}, "conceptexpress"),  # runs from before `method` was recorded
    ],
)
def test_method_label(manifest, label):
    assert method_label(manifest) == label


def test_row_order_and_names():
    rows = method_order(["conceptexpress", "conceptexpress -Reg", "bas-dagger", "conceptexpress -SnM -Reg"])
    assert rows == ["bas-dagger", "conceptexpress -SnM -Reg", "conceptexpress -Reg", "conceptexpress"]
    assert [method_name(r) for r in rows] == ["BaS†", "ConceptExpress −SnM −Reg", "ConceptExpress −Reg", "ConceptExpress"]
