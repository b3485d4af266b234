"""The localization benchmark of paper §4.5: ours vs k-means@k vs FINCH@k on one shared attention per image.

With ``BenchConfig.maskcut`` the training-free reference column "MC" of Table 3 is added: MaskCut (CutLER) on
DINO features of the image itself (:mod:`.maskcut`), which does not use the attention.

For every image: one localization pass (``ConceptLocalizer.attention``, cached in ``OUT/attention/``), then
three clusterings of that same attention — ours (``cluster_concepts``, automatic N), k-means with k clusters
and plain FINCH reduced to k clusters, both followed by our [EOT] filter (Eq. 5) — masks upsampled to the
source size (``upsample_masks``, as the localizer does) and Hungarian-matched to the ground truth
(:mod:`.matching`). Outputs in ``OUT``: ``table.md`` (paper Table 3), ``figure.png`` (paper Fig. 7),
``results.json`` (per image, per method, resolved config; written last, so its presence means "finished").
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm

from conceptexpress.attention.localizer import ConceptLocalizer
from conceptexpress.config import BenchConfig, LocalizeConfig, config_dict
from conceptexpress.io.atomic import (
    atomic_save_image,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    ensure_output_dir,
)
from conceptexpress.io.images import upsample_masks
from conceptexpress.io.manifest import versions
from conceptexpress.localize import cluster_concepts

from ..baselines.clustering import finch_fixed_concepts, finch_levels, kmeans_concepts
from ..baselines.maskcut import MaskCut
from .dataset import BenchSample, load_dataset
from .matching import ImageMatch, aggregate, match_masks
from .report import bench_figure, format_table, method_names

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = ["BenchConfig", "bench_localize", "format_table", "method_names"]

logger = logging.getLogger(__name__)

RESULTS, TABLE, FIGURE, CACHE_DIR = "results.json", "table.md", "figure.png", "attention"
_CACHE_FORMAT = "conceptexpress-bench-attention-1"


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


def bench_localize(
    dataset_dir: str | Path,
    config: BenchConfig | None = None,
    *,
    pipe: StableDiffusionPipeline,
    localize_config: LocalizeConfig | None = None,
    out_dir: str | Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the benchmark on a dataset (layout: :mod:`.dataset`) and write ``OUT/{table.md,figure.png,results.json}``.

    Args:
        dataset_dir: the dataset folder.
        config: benchmark options (cluster counts, IoU threshold, k-means seed, cache, figure, MaskCut column).
        pipe: a loaded Stable Diffusion pipeline (the one localization uses).
        localize_config: localization options; ``n_max`` drives ours, the rest shape the shared attention.
        out_dir: output folder; ``OUT/attention/<name>.safetensors`` caches each image's attention.
        progress: show a progress bar.

    Returns:
        The content of ``results.json``: ``summary[method]`` holds the dataset scores (fractions in [0, 1]),
        ``images[i]["methods"][method]`` the per-image matches.

    Raises:
        InputError: the dataset is missing, empty or inconsistent (checked before any UNet pass).
        ModelLoadError: ``config.maskcut`` is on and its ViT cannot be loaded (checked before any UNet pass).
        OutputError: ``out_dir`` cannot be written.
    """
    config = config or BenchConfig()
    localize_config = localize_config or LocalizeConfig()
    samples = load_dataset(dataset_dir, limit=config.limit)
    out = ensure_output_dir(out_dir)
    (out / RESULTS).unlink(missing_ok=True)  # until the new results land, the folder must not look finished
    if config.cache:
        ensure_output_dir(out / CACHE_DIR)
    localizer = ConceptLocalizer(pipe, localize_config)
    model_key = _model_fingerprint(pipe)
    maskcut = _maskcut(config, pipe)  # loaded now: a bad --maskcut-model fails before any UNet pass
    methods = method_names(config.ks, maskcut=config.maskcut)
    matches: dict[str, list[ImageMatch]] = {m: [] for m in methods}
    seconds: dict[str, float] = {"attention": 0.0, **{m: 0.0 for m in methods}}
    images: list[dict[str, Any]] = []
    figure_rows: list[tuple[Image.Image, np.ndarray, dict[str, np.ndarray]]] = []
    figure_methods = (f"kmeans@{config.fig_k}", f"finch@{config.fig_k}", "ours")

    for sample in _progress(samples, progress):
        image, gt = sample.load()
        t0 = time.perf_counter()
        attn, eot, latent_hw, cached = _attention(
            localizer, sample, image, out, model_key, localize_config, config
        )
        seconds["attention"] += time.perf_counter() - t0
        predicted = _cluster_all(attn, eot, config, localize_config.n_max, seconds)
        if maskcut is not None:
            t0 = time.perf_counter()
            mc = maskcut(image, config.maskcut_masks or int(gt.shape[0]))  # 0 = "given": one per object
            seconds["maskcut"] += time.perf_counter() - t0
            predicted["maskcut"] = (mc.masks, mc.messages)  # (M, h, w) on the ViT's patch grid
        record: dict[str, Any] = {
            "name": sample.name,
            "image": str(sample.image_path),
            "size": list(image.size),
            "latent_hw": list(latent_hw),
            "num_gt": int(gt.shape[0]),
            "attention_cached": cached,
            "methods": {},
        }
        upsampled: dict[str, np.ndarray] = {}
        for method in methods:
            latent_masks, messages = predicted[method]
            masks = upsample_masks(latent_masks, image.size)  # (P, H, W) bool at the source size (MC: from patches)
            match = match_masks(masks, gt, config.iou_threshold)
            matches[method].append(match)
            record["methods"][method] = {**match.to_dict(), "messages": list(messages)}
            upsampled[method] = masks
        images.append(record)
        if len(figure_rows) < config.figure_rows:
            figure_rows.append((image, gt, {m: upsampled[m] for m in figure_methods}))
        del attn, predicted, upsampled

    summary = {m: aggregate(matches[m]).to_dict() for m in methods}
    if figure_rows:
        atomic_save_image(bench_figure(figure_rows, config.fig_k), out / FIGURE)
    atomic_write_text(out / TABLE, format_table(summary, config.ks, config.iou_threshold, config.maskcut_clust))
    results = {
        "benchmark": "concept localization (ConceptExpress paper §4.5, Table 3)",
        "dataset": str(Path(dataset_dir).resolve()),
        "num_images": len(images),
        "methods": methods,
        "config": {
            **config_dict(config, localize_config),
            "model": str(getattr(pipe, "name_or_path", "") or ""),
        },
        "definitions": {**DEFINITIONS, **({"maskcut": MASKCUT_DEFINITION} if maskcut is not None else {})},
        "summary": summary,
        "images": images,
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
        "versions": _versions(),
    }
    atomic_write_json(out / RESULTS, results)
    return results


DEFINITIONS = {
    "matching": "Hungarian, one-to-one, maximizing total IoU at the source image's resolution; pairs with IoU 0 are not matches",
    "iou": "mean over ground-truth objects of the IoU with the matched prediction, an unmatched object counting 0",
    "iou_matched": "mean IoU over matched pairs only",
    "recall": "matched pairs with IoU >= iou_threshold / ground-truth objects",
    "precision": "matched pairs with IoU >= iou_threshold / predicted masks (0 when there is none)",
    "summary": "micro averages over all objects and masks of the dataset; macro_* = mean of per-image values",
}


MASKCUT_DEFINITION = (
    "MaskCut (CutLER) without CRF: keys of the last layer of the DINO ViT on the image resized to "
    "maskcut_resolution^2; cosine graph (1 above maskcut_tau, else 1e-5); second generalized eigenvector of "
    "(D - W) y = lambda D y split at its mean; foreground = side of the largest |y|, flipped when it holds 3 or 4 "
    "grid corners, cut to its 4-connected component; repeated on the untaken patches up to maskcut_masks times "
    "(0 = number of ground-truth objects); patch masks brought to the image size by upsample_masks"
)


def _maskcut(config: BenchConfig, pipe):
    """The loaded :class:`~.maskcut.MaskCut` of ``config``, on the pipeline's device; None when not asked for."""
    if not config.maskcut:
        return None

    return MaskCut(
        config.maskcut_model,
        device=getattr(pipe, "device", "cpu"),
        resolution=config.maskcut_resolution,
        tau=config.maskcut_tau,
        num_masks=config.maskcut_masks or 1,
    ).load()


def _cluster_all(
    attn: torch.Tensor, eot: torch.Tensor, config: BenchConfig, n_max: int, seconds: dict[str, float]
) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
    """(latent masks (M, h, w) bool, messages) of every method on one image's attention."""
    out: dict[str, tuple[np.ndarray, tuple[str, ...]]] = {}
    for k in config.ks:
        t0 = time.perf_counter()
        r = kmeans_concepts(attn, eot, k, config.seed, n_init=config.kmeans_n_init)
        seconds[f"kmeans@{k}"] += time.perf_counter() - t0
        out[f"kmeans@{k}"] = (r.masks, r.messages)
    t0 = time.perf_counter()
    levels = finch_levels(attn)  # one hierarchy, reduced to every k
    shared = (time.perf_counter() - t0) / len(config.ks)
    for k in config.ks:
        t0 = time.perf_counter()
        r = finch_fixed_concepts(attn, eot, k, levels=levels)
        seconds[f"finch@{k}"] += time.perf_counter() - t0 + shared
        out[f"finch@{k}"] = (r.masks, r.messages)
    t0 = time.perf_counter()
    ours = cluster_concepts(attn, eot, n_max=n_max)
    seconds["ours"] += time.perf_counter() - t0
    out["ours"] = (ours.masks.numpy(), ours.messages)
    return out


# ----------------------------------------------------------------------------- attention cache
def _attention(
    localizer,
    sample: BenchSample,
    image: Image.Image,
    out: Path,
    model_key: str,
    loc: LocalizeConfig,
    config: BenchConfig,
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int], bool]:
    """(attn (h·w, h·w) float32, eot (h, w) float32, (h, w), from cache?) for one image."""
    key = _cache_key(sample.image_path, model_key, loc, config.cache_dtype)
    path = out / CACHE_DIR / f"{sample.name}.safetensors"
    if config.cache and path.is_file():
        hit = _read_cache(path, key)
        if hit is not None:
            return (*hit, True)
    maps = localizer.attention(image)
    stored = maps.attn.to(getattr(torch, config.cache_dtype)).contiguous()  # what the cache holds
    eot = maps.eot.float().contiguous()
    if config.cache:
        meta = {"format": _CACHE_FORMAT, "key": key, "latent_hw": json.dumps(list(maps.latent_hw))}
        atomic_write_bytes(path, save({"attn": stored, "eot": eot}, metadata=meta))
    return _from_stored(stored), eot, tuple(maps.latent_hw), False


def _from_stored(stored: torch.Tensor) -> torch.Tensor:
    """float32 attention from its stored form; half precision is renormalized so that rows sum to 1 again."""
    if stored.dtype == torch.float32:
        return stored
    attn = stored.float()
    return attn / attn.sum(dim=1, keepdim=True)


def _read_cache(path: Path, key: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]] | None:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _CACHE_FORMAT or meta.get("key") != key:
                logger.info(
                    "attention cache '%s' was made with another image, model or option; recomputing", path
                )
                return None
            attn, eot = f.get_tensor("attn"), f.get_tensor("eot")
            latent_hw = tuple(json.loads(meta["latent_hw"]))
    except Exception as e:  # noqa: BLE001 - an unreadable cache file is recomputed, never fatal
        logger.warning("attention cache '%s' is unreadable (%s); recomputing", path, e)
        return None
    return _from_stored(attn), eot, latent_hw  # type: ignore[return-value]


def _cache_key(image_path: Path, model_key: str, loc: LocalizeConfig, cache_dtype: str) -> str:
    """Everything the attention depends on: image bytes, model weights, the localization pass's options."""
    spec = {
        "image_sha256": hashlib.sha256(Path(image_path).read_bytes()).hexdigest(),
        "model": model_key,
        "weighting": loc.weighting,
        "resolution": loc.resolution,
        "timestep": loc.timestep,
        "dtype": cache_dtype,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _model_fingerprint(pipe) -> str:
    """Hash of the model's name, dtype and a sample of its weights (first/last tensors of VAE, UNet, text encoder).

    Cheap (a few thousand numbers per tensor) and enough to tell two checkpoints apart; delete OUT/attention/ or
    pass ``cache=False`` after editing weights in ways this cannot see.
    """
    h = hashlib.sha256(str(getattr(pipe, "name_or_path", "")).encode())
    for module in (pipe.vae, pipe.unet, pipe.text_encoder):
        params = list(module.parameters())
        for p in params[:3] + params[-3:]:
            h.update(f"{tuple(p.shape)}{p.dtype}".encode())
            h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- helpers
def _progress(samples: list[BenchSample], enabled: bool):
    if not enabled:
        return samples

    return tqdm(samples, desc="bench-localize", unit="image", dynamic_ncols=True)


def _versions() -> dict[str, str]:
    return versions("scikit-learn")
