"""Write and read the files of a localization run (one folder per image).

Layout (README, "What `extract` writes")::

    OUT/masks/concept_01.png …   one mask per concept at the source image's size (L, 0/255)
    OUT/overlay.png              every concept a coloured, numbered region (paper Fig. 3 left)
    OUT/stages.png               pre-clustering | filtering | post-clustering
    OUT/localization.safetensors latent masks m_i, centroids f_i (Eq. 6), [EOT] map, stage labels
    OUT/localization.json        N, file names, sizes, model, config, versions — written LAST

Every file is written atomically, and ``localization.json`` only after all others, so a folder with that
file is complete; an interrupted run leaves no file that looks finished. Later stages (token learning,
evaluation) read the localization back with :func:`read_localization` and never recompute it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from safetensors.torch import save as save_tensors

from ..errors import InputError
from ..viz import overlay_concepts, stages_figure
from .atomic import atomic_save_image, atomic_write_bytes, atomic_write_json, ensure_output_dir
from .run_folder import LOCALIZATION_MANIFEST as MANIFEST
from .run_folder import LOCALIZATION_TENSORS as TENSORS
from .run_folder import versions


def mask_name(i: int) -> str:
    """File name of concept ``i`` (0-based) — 1-based in names, like the numbers on the overlay."""
    return f"masks/concept_{i + 1:02d}.png"


def save_localization(loc, image: Image.Image, out_dir: str | Path, *, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the folder described in the module docstring and return the manifest dict.

    ``loc`` is a :class:`conceptexpress.localizer.Localization`; ``image`` the RGB source photo;
    ``meta`` extra JSON-ready entries (image path, model, resolved config).
    """
    out = ensure_output_dir(out_dir)
    # Invalidate a previous run first: until the new manifest lands, the folder must not look complete.
    (out / MANIFEST).unlink(missing_ok=True)
    (out / "masks").mkdir(exist_ok=True)
    for stale in (out / "masks").glob("concept_*.png"):
        stale.unlink()

    clusters = loc.clusters
    names = [mask_name(i) for i in range(loc.num_concepts)]
    for name, mask in zip(names, loc.masks):
        atomic_save_image(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"), out / name)
    atomic_save_image(overlay_concepts(image, loc.masks), out / "overlay.png")
    atomic_save_image(
        stages_figure(image, clusters.pre_labels.numpy(), clusters.kept.numpy(), clusters.post_labels.numpy()),
        out / "stages.png",
    )
    tensors = {
        "masks": clusters.masks.to(torch.uint8).contiguous(),  # (N, h, w) 0/1
        "centroids": clusters.centroids.float().contiguous(),  # (N, h·w)
        "eot": loc.eot.float().contiguous(),  # (h, w) raw [EOT] cross-attention
        "pre_labels": clusters.pre_labels.contiguous(),  # (h, w)
        "post_labels": clusters.post_labels.contiguous(),  # (h, w), -1 = background
    }
    atomic_write_bytes(out / TENSORS, save_tensors(tensors, metadata={"format": "conceptexpress-localization-1"}))
    manifest = {
        "num_concepts": loc.num_concepts,
        "masks": names,
        "overlay": "overlay.png",
        "stages": "stages.png",
        "tensors": TENSORS,
        "source_size": list(loc.source_size),
        "work_size": list(loc.work_size),
        "latent_size": list(loc.latent_hw),
        "self_attention_layers": loc.self_attention_layers,
        "cross_attention_layers": loc.cross_attention_layers,
        "pre_clustering": {
            "levels": list(clusters.levels),
            "level": clusters.pre_level,
            "clusters": int(clusters.kept.numel()),
            "kept": int(clusters.kept.sum()),
            "delta": None if clusters.delta is None else float(clusters.delta),  # None: no δ constraint
            "clustering": clusters.clustering,
        },
        "messages": list(clusters.messages),
        "versions": versions(),
        **meta,
    }
    atomic_write_json(out / MANIFEST, manifest)
    return manifest


def read_localization(out_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a finished localization folder: (manifest, tensors). Raises InputError if it is not finished."""
    out = Path(out_dir)
    if not (out / MANIFEST).is_file():
        raise InputError(f"{str(out)!r} holds no finished localization (no {MANIFEST}); run `conceptexpress localize`")
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    return manifest, load_file(str(out / manifest["tensors"]))
