"""Phases 1 and 2 of :func:`~conceptexpress.evaluate.protocol.evaluate_runs`: generated images and SAM masks.

Each phase loads one family of models, fills the run's cache (:mod:`.cache`) and frees the models again.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Mapping
from dataclasses import fields
from typing import Any

import torch

from ..config import EvalConfig, ModelConfig
from ..embeddings import run_tokens
from ..errors import ConfigError
from ..generate import generate, run_model_config, sampler_record
from ..io.checked import file_sha256
from .cache import EVAL_DIR, GeneratedCache, cache_key, read_sam_cache, write_sam_cache
from .progress import progress_bar
from .runs import load_masks, load_source
from .sam import SamMasker

__all__ = ["check_model_options", "generate_all", "sam_all"]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- phase 1: generation
def check_model_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    """The :class:`~conceptexpress.config.ModelConfig` fields a user set (None = unset), checked now.

    Raises:
        ConfigError: an unknown key, or a bad ``device`` / ``dtype`` / ``model``.
    """
    allowed = [f.name for f in fields(ModelConfig)]
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        raise ConfigError(f"`model_options` has unknown keys {unknown}; allowed: {allowed}")
    given = {k: v for k, v in (options or {}).items() if v is not None}
    ModelConfig(**given)  # a bad --device / --dtype / --model fails here, before any work
    return given


def _prompts(run, config: EvalConfig) -> list[tuple[str, str, int]]:
    """``(folder name, prompt, images)`` of a run: each concept alone, then all together."""
    tokens = run.tokens
    out = [(f"concept_{i + 1:02d}", f"a photo of {t}", config.images_per_concept) for i, t in enumerate(tokens)]
    out.append(("all", "a photo of " + " and ".join(tokens), config.compositional_images))
    return out


def _generation_cache(run, model: ModelConfig, config: EvalConfig):
    key = {
        "format": "conceptexpress-eval-generated-1",
        "model": model.model,
        "single_file_config": model.single_file_config,
        "scheduler": config.scheduler,
        "steps": config.steps,
        "guidance": float(config.guidance),
        "seed": config.seed,
        # Retraining a run in place changes its token files, hence the key: stale pictures are never reused.
        "tokens": {e["token"]: file_sha256(run.path / e["file"]) for e in run.manifest["tokens"]},
    }
    return GeneratedCache(run.path, key)


def generate_all(runs, config: EvalConfig, options: dict[str, Any], pipe_loader: Callable, progress: bool):
    """Phase 1: make sure every run has its images; returns ``{label: {"concepts": [[Path]], "all": [Path]}}``.

    ``options``: ModelConfig overrides (:func:`check_model_options`); ``pipe_loader``: ModelConfig → pipeline.
    """
    plans = []
    for run in runs:
        model = run_model_config(run.manifest, options, run.path)
        cache = _generation_cache(run, model, config)
        todo = [(name, prompt, n, cache.available(name, prompt)) for name, prompt, n in _prompts(run, config)]
        plans.append((run, model, cache, todo))
    missing = sum(max(n - have, 0) for *_, todo in plans for _, _, n, have in todo)
    # Runs of one base model together, so each model is loaded once.
    plans.sort(key=lambda p: (p[1].model, p[1].single_file_config or ""))

    out: dict[str, dict[str, Any]] = {}
    pipe, pipe_model = None, None
    with progress_bar(missing, "generate", "image", progress) as bar:
        for run, model, cache, todo in plans:
            if any(have < n for _, _, n, have in todo):
                if pipe is None or pipe_model != model:
                    pipe = None
                    _free_memory()
                    pipe, pipe_model = pipe_loader(model), model
                # The next run's tokens have the same names (<c1>, …): this run's leave the pipeline at the end.
                with run_tokens(pipe, run.path):
                    for name, prompt, n, have in todo:
                        if have >= n:
                            continue
                        gen_cfg = config.generate_config(n - have, start=have)
                        images = generate(pipe, [prompt], gen_cfg)[0]
                        extra = {
                            "seeds": [config.seed + i for i in range(n)],
                            "sampler": sampler_record(pipe, gen_cfg),
                            "model": model.model,
                            "device": str(getattr(pipe, "device", "")),
                            "dtype": str(getattr(pipe, "dtype", "")).removeprefix("torch."),
                        }
                        cache.extend(name, prompt, have, images, extra)
                        bar.update(n - have)
            names = {name: n for name, _, n, _ in todo}
            out[run.label] = {
                "root": cache.root,
                "concepts": [cache.paths(name, names[name]) for name, *_ in todo[:-1]],
                "all": cache.paths("all", names["all"]),
            }
    del pipe
    _free_memory()
    return out


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- phase 2: SAM
def sam_all(runs, config: EvalConfig, device, progress: bool) -> dict[str, list[dict[str, Any]]]:
    """Phase 2: every concept's SAM mask; returns ``{label: [{"mask", "points", "score", "fallback", "area"}]}``."""
    jobs = []
    for run in runs:
        key = {
            "format": "conceptexpress-eval-sam-1",
            "sam": config.sam,
            "points": config.sam_points,
            "seed": config.seed,
            "image_sha256": run.image_sha256,
            "masks": [file_sha256(p) for p in run.masks],
        }
        folder = run.path / EVAL_DIR / f"sam-{cache_key(key)}"
        jobs.append((run, key, folder, read_sam_cache(folder, key, len(run.masks))))

    out: dict[str, list[dict[str, Any]]] = {}
    memo: dict[str, list[dict[str, Any]]] = {}  # same photo and masks (another method's run): segment once
    masker = None
    with progress_bar(sum(c is None for *_, c in jobs), "sam", "image", progress) as bar:
        for run, key, folder, cached in jobs:
            if cached is None:
                memo_key = cache_key(key)
                if memo_key not in memo:
                    masker = masker or SamMasker(config.sam, device=device)
                    masks = load_masks(run)
                    preds = masker.masks_from_points(load_source(run), masks, config.sam_points, config.seed)
                    concepts = []
                    for pred, extracted in zip(preds, masks):
                        fallback = not pred.mask.any()
                        if fallback:
                            logger.warning("%s: SAM returned an empty mask for a concept; using the extracted mask", run.label)
                        mask = extracted if fallback else pred.mask
                        concepts.append(
                            {
                                "mask": mask,
                                "points": pred.points.tolist(),
                                "score": pred.score,
                                "fallback": fallback,
                                "area": float(mask.mean()),
                            }
                        )
                    memo[memo_key] = concepts
                concepts = [{**c, "token": t} for c, t in zip(memo[memo_key], run.tokens)]
                write_sam_cache(folder, key, concepts)
                cached = concepts
                bar.update(1)
            out[run.label] = cached
    if masker is not None:
        masker.unload()
    _free_memory()
    return out
