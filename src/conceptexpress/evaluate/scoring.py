"""Phase 3 of :func:`~conceptexpress.evaluate.protocol.evaluate_runs`: features, metrics and ``summary.json``.

:data:`DEFINITIONS` states how every number is computed; it is written into the summary.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import EvalConfig
from ..generate import run_model_config
from ..io.manifest import versions
from .encoders import build_encoder
from .metrics import compositional_similarity, identity_similarity, topk_correct
from .progress import progress_bar
from .runs import load_source
from .sam import masked_concept_image

__all__ = ["DEFINITIONS", "SUMMARY_FORMAT", "TOPK", "build_summary", "score_runs"]

SUMMARY_FORMAT = "conceptexpress-eval-1"
TOPK = (1, 3)  # paper Table 1 reports ACC^1 and ACC^3

DEFINITIONS = {
    "points": "sam_points distinct pixels drawn uniformly without replacement from the extracted mask "
    "(numpy default_rng(seed), fresh per concept), passed to SAM as pixel centres (x + 0.5, y + 0.5)",
    "sam_mask": "SAM prompted with all points at once (labels 1), multimask output; the candidate with the highest "
    "predicted IoU, upsampled to the photo and thresholded at logit 0; an empty SAM mask falls back to the "
    "extracted mask (sam_fallback = true)",
    "masked_concept": "the source photo with pixels outside the SAM mask set to black (0, 0, 0); with crop: cut to "
    "the mask's bounding box and padded with black to a centred square",
    "features": "encoder features, L2-normalized: CLIP = projected image embedding, DINO = last-layer [CLS] token; "
    "each encoder's own image processor",
    "SIM^I": "per concept: mean over its images_per_concept generations ('a photo of [V_i]') of cos(masked concept, "
    "generated); method value = mean over the method's concepts",
    "SIM^C": "per source photo: mean over its compositional_images generations ('a photo of [V_1] and ... [V_N]') of "
    "cos(whole unmasked photo, generated); method value = mean over the method's photos",
    "ACC^k": "prototypes = masked-concept features of every concept of the method's runs (one per concept); queries = "
    "every single-concept generated image of the method, labelled with its concept; a query is correct when fewer "
    "than k other prototypes have a cosine >= its own prototype's (ties count against it); method value = correct "
    "queries / queries",
}


# ----------------------------------------------------------------------------- phase 3: features and metrics
def _open_rgb(path: Path):
    with Image.open(path) as im:
        return im.convert("RGB")


def _encode_run(encoder, run, generated: dict[str, Any], sam: list[dict[str, Any]], crop: bool):
    """Features of one run: source ``(D,)``, masked concepts ``(N, D)``, per-concept generations ``[(K, D)]``,
    compositional generations ``(K', D)``."""
    source = load_source(run)
    masked = [masked_concept_image(source, c["mask"], crop) for c in sam]
    per_concept = [[_open_rgb(p) for p in paths] for paths in generated["concepts"]]
    comp = [_open_rgb(p) for p in generated["all"]]
    feats = encoder.encode([source, *masked, *(im for ims in per_concept for im in ims), *comp])  # (1+N+ΣK+K', D)
    n = len(masked)
    gen, start = [], 1 + n
    for ims in per_concept:
        gen.append(feats[start : start + len(ims)])
        start += len(ims)
    return feats[0], feats[1 : 1 + n], gen, feats[start:]


def score_runs(runs, generated, sam, config: EvalConfig, device, progress: bool):
    """Phase 3: encode sources, SAM-masked concepts and generations with each encoder and score them.

    Returns ``(concept_rows, image_rows)``, the rows of ``concepts.csv`` and ``images.csv``.
    """
    concept_rows: list[dict[str, Any]] = []
    image_rows: list[dict[str, Any]] = []
    methods = list(dict.fromkeys(r.method for r in runs))
    for enc_name in config.encoder_names:
        enc_id = config.encoder_id(enc_name)
        encoder = build_encoder(enc_name, enc_id, device=device)
        feats = {}
        with progress_bar(len(runs), f"encode {enc_name}", "image", progress) as bar:
            for run in runs:
                feats[run.label] = _encode_run(encoder, run, generated[run.label], sam[run.label], config.crop)
                bar.update(1)
        encoder.unload()
        for method in methods:
            mruns = [r for r in runs if r.method == method]
            # The method's classifier: one prototype per concept of its runs (paper §4.2, ACC^k).
            prototypes = torch.cat([feats[r.label][1] for r in mruns])  # (P, D)
            # Queries: every generated single-concept image, labelled with its concept's prototype row.
            gens = [g for r in mruns for g in feats[r.label][2]]  # P tensors (K, D), prototype order
            q = torch.cat(gens)  # (Q, D)
            y = torch.cat([torch.full((g.shape[0],), j) for j, g in enumerate(gens)])  # (Q,)
            correct = {k: topk_correct(q, y, prototypes, k) for k in TOPK}  # (Q,) bool each
            label = 0
            for r in mruns:
                source, masked, gen, comp = feats[r.label]
                for i, (token, g) in enumerate(zip(r.tokens, gen)):
                    hits = y == label  # this concept's queries
                    label += 1
                    s = sam[r.label][i]
                    concept_rows.append(
                        {
                            "method": method,
                            "run": r.label,
                            "token": token,
                            "concept": i + 1,
                            "encoder": enc_name,
                            "encoder_model": enc_id,
                            "sim_i": identity_similarity(masked[i], g),
                            "images": int(g.shape[0]),
                            "top1_correct": int(correct[1][hits].sum()),
                            "top3_correct": int(correct[3][hits].sum()),
                            "prototypes": int(prototypes.shape[0]),
                            "sam_score": float(s["score"]),
                            "sam_area": float(s["area"]),
                            "sam_fallback": bool(s["fallback"]),
                        }
                    )
                per_image = [compositional_similarity(source, c[None]) for c in comp]
                image_rows.append(
                    {
                        "method": method,
                        "run": r.label,
                        "image": str(r.image),
                        "encoder": enc_name,
                        "encoder_model": enc_id,
                        "sim_c": compositional_similarity(source, comp),
                        "images": int(comp.shape[0]),
                        "per_image": per_image,
                    }
                )
    return concept_rows, image_rows


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def build_summary(runs, skipped, concept_rows, image_rows, config: EvalConfig, options, out: Path) -> dict[str, Any]:
    """The content of ``summary.json``: per method and encoder the four metrics, with definitions and versions."""
    methods: dict[str, Any] = {}
    for method in dict.fromkeys(r.method for r in runs):
        mruns = [r for r in runs if r.method == method]
        metrics = {}
        for enc in config.encoder_names:
            crows = [c for c in concept_rows if c["method"] == method and c["encoder"] == enc]
            irows = [i for i in image_rows if i["method"] == method and i["encoder"] == enc]
            queries = sum(c["images"] for c in crows)
            metrics[enc] = {
                "sim_i": _mean([c["sim_i"] for c in crows]),
                "sim_c": _mean([i["sim_c"] for i in irows]),
                "acc1": sum(c["top1_correct"] for c in crows) / queries if queries else None,
                "acc3": sum(c["top3_correct"] for c in crows) / queries if queries else None,
                "queries": queries,
                "prototypes": len(crows),
            }
        methods[method] = {
            "runs": len(mruns),
            "concepts": sum(len(r.tokens) for r in mruns),
            "base_models": sorted({run_model_config(r.manifest, options, r.path).model for r in mruns}),
            "metrics": metrics,
        }
    return {
        "format": SUMMARY_FORMAT,
        "complete": True,
        "num_runs": len(runs),
        "num_concepts": sum(len(r.tokens) for r in runs),
        "encoders": {name: config.encoder_id(name) for name in config.encoder_names},
        "sam": config.sam,
        "config": asdict(config),
        "model_options": options,
        "definitions": DEFINITIONS,
        "methods": methods,
        "runs": [
            {"run": r.label, "method": r.method, "path": str(r.path.resolve()), "image": str(r.image), "concepts": len(r.tokens)}
            for r in runs
        ],
        "skipped": skipped,
        "files": {
            "concepts": ["concepts.csv", "concepts.json"],
            "images": ["images.csv", "images.json"],
            "table": "table.md",
        },
        "out": str(out.resolve()),
        "versions": versions(),
    }
