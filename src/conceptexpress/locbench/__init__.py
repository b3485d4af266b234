"""Concept-localization benchmark (paper §4.5, Table 3 and Fig. 7): datasets, matching, baselines, runner.

Imported lazily: ``conceptexpress.locbench.matching`` and ``.baselines`` are pure (numpy/scipy/torch), and
nothing here loads diffusers until :func:`bench_localize` runs. ``.maskcut`` (the reference column "MC")
imports transformers only when its ViT loads.

    >>> from conceptexpress.locbench import BenchConfig, bench_localize, write_synthetic_dataset
    >>> write_synthetic_dataset("/tmp/scenes", 8)
    >>> results = bench_localize("/tmp/scenes", BenchConfig(), pipe=pipe, out_dir="/tmp/bench")
    >>> results["summary"]["ours"]["iou"], results["summary"]["kmeans@7"]["recall"]
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "match_masks": "conceptexpress.locbench.matching",
    "iou_matrix": "conceptexpress.locbench.matching",
    "aggregate": "conceptexpress.locbench.matching",
    "ImageMatch": "conceptexpress.locbench.matching",
    "DatasetScores": "conceptexpress.locbench.matching",
    "BaselineClusters": "conceptexpress.baselines.clustering",
    "eot_filter": "conceptexpress.localize",
    "kmeans_concepts": "conceptexpress.baselines.clustering",
    "finch_fixed_concepts": "conceptexpress.baselines.clustering",
    "finch_levels": "conceptexpress.baselines.clustering",
    "MaskCut": "conceptexpress.baselines.maskcut",
    "MaskCutResult": "conceptexpress.baselines.maskcut",
    "NormalizedCut": "conceptexpress.baselines.maskcut",
    "normalized_cut": "conceptexpress.baselines.maskcut",
    "maskcut_masks": "conceptexpress.baselines.maskcut",
    "BenchSample": "conceptexpress.locbench.dataset",
    "load_dataset": "conceptexpress.locbench.dataset",
    "read_instance_masks": "conceptexpress.locbench.dataset",
    "convert_clevr_masks": "conceptexpress.locbench.dataset",
    "make_scene": "conceptexpress.locbench.scenes",
    "write_synthetic_dataset": "conceptexpress.locbench.scenes",
    "BenchConfig": "conceptexpress.config",
    "bench_localize": "conceptexpress.locbench.run",
    "format_table": "conceptexpress.locbench.report",
    "bench_figure": "conceptexpress.locbench.report",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'conceptexpress.locbench' has no attribute {name!r}")
