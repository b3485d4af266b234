"""Evaluation protocol of paper §4.2: SIM^I, SIM^C, ACC^1, ACC^3 with CLIP and DINO, SAM-masked concepts.

Exports resolve lazily, so ``conceptexpress.evaluate.metrics`` (pure functions on features) never imports
transformers or diffusers::

    from conceptexpress.evaluate import EvalConfig, evaluate_runs
    result = evaluate_runs(["outputs/runs-ours", "outputs/runs-bas"], EvalConfig(images_per_concept=8))
    print(result.table)                       # paper Table 1, one block per encoder

Layout: ``metrics.py`` (pure metrics), ``encoders.py`` (CLIP / DINO adapters), ``sam.py`` (points, SAM, masked
images), ``runs.py`` (finding runs), ``cache.py`` (generated images and SAM masks in ``RUN/eval/``),
``report.py`` (CSV / JSON / table), ``protocol.py`` (``EvalConfig``, ``evaluate_runs``), ``phases.py`` (generation, SAM), ``scoring.py`` (features, metrics, summary)
(the command is ``conceptexpress.cli.evaluate``), ``testing.py`` (tiny random models).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EvalConfig": "conceptexpress.config",
    "EvalResult": "conceptexpress.evaluate.protocol",
    "evaluate_runs": "conceptexpress.evaluate.protocol",
    "DEFINITIONS": "conceptexpress.evaluate.protocol",
    "identity_similarity": "conceptexpress.evaluate.metrics",
    "compositional_similarity": "conceptexpress.evaluate.metrics",
    "topk_accuracy": "conceptexpress.evaluate.metrics",
    "topk_correct": "conceptexpress.evaluate.metrics",
    "cosine_similarity_matrix": "conceptexpress.evaluate.metrics",
    "ImageEncoder": "conceptexpress.evaluate.encoders",
    "ClipImageEncoder": "conceptexpress.evaluate.encoders",
    "DinoImageEncoder": "conceptexpress.evaluate.encoders",
    "build_encoder": "conceptexpress.evaluate.encoders",
    "SamMasker": "conceptexpress.evaluate.sam",
    "masked_concept_image": "conceptexpress.evaluate.sam",
    "sample_mask_points": "conceptexpress.evaluate.sam",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'conceptexpress.evaluate' has no attribute {name!r}")
