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

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as save_tensors

from ..errors import InputError, RunFolderError
from ..viz import overlay_concepts, stages_figure
from .atomic import atomic_save_image, atomic_write_bytes, atomic_write_json, ensure_output_dir
from .run_folder import LOCALIZATION_MANIFEST as MANIFEST
from .run_folder import LOCALIZATION_TENSORS as TENSORS
from .run_folder import read_json_checked, read_safetensors_checked, resolve_inside, versions


def mask_name(i: int) -> str:
    """File name of concept ``i`` (0-based) — 1-based in names, like the numbers on the overlay."""
    return f"masks/concept_{i + 1:02d}.png"


def save_localization(loc, image: Image.Image, out_dir: str | Path, *, meta: dict[str, Any]) -> dict[str, Any]:
    """Write the folder described in the module docstring and return the manifest dict.

    ``loc`` is a :class:`conceptexpress.localize.result.Localization`; ``image`` the RGB source photo;
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
    data = save_tensors(tensors, metadata={"format": "conceptexpress-localization-1"})
    atomic_write_bytes(out / TENSORS, data)
    manifest = {
        "num_concepts": loc.num_concepts,
        "masks": names,
        "overlay": "overlay.png",
        "stages": "stages.png",
        "tensors": TENSORS,
        "tensors_sha256": hashlib.sha256(data).hexdigest(),  # checked by read_localization
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


def _pair(manifest: dict[str, Any], key: str, source: Path) -> tuple[int, int]:
    value = manifest.get(key)
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                               for v in value)):
        raise RunFolderError(f"{str(source)!r} is damaged: {key!r} is {value!r}, expected [height, width] integers")
    return value[0], value[1]


def read_localization(out_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a finished localization folder: (manifest, tensors), every entry checked.

    ``localization.json`` must have the schema :func:`save_localization` writes; the files it names must lie
    inside the folder; the tensor file must have the SHA-256 it records (when it records one: older folders do
    not), a readable header, and tensors of the shapes and dtypes the manifest implies.

    Raises:
        InputError: the folder holds no finished localization (no ``localization.json``).
        RunFolderError: (an InputError) a file is damaged, malformed, or named outside the folder; the message
            names it.
    """
    out = Path(out_dir)
    path = out / MANIFEST
    if not path.is_file():
        raise InputError(f"{str(out)!r} holds no finished localization (no {MANIFEST}); run `conceptexpress localize`")
    manifest = read_json_checked(path)
    n = manifest.get("num_concepts")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise RunFolderError(f"{str(path)!r} is damaged: 'num_concepts' is {n!r}, expected an integer >= 0")
    masks = manifest.get("masks")
    if not isinstance(masks, list) or len(masks) != n:
        raise RunFolderError(f"{str(path)!r} is damaged: 'masks' must list {n} files, got {masks!r}")
    for rel in [*masks, *(manifest[k] for k in ("overlay", "stages") if k in manifest)]:
        resolve_inside(out, rel, source=path)
    h, w = _pair(manifest, "latent_size", path)
    _pair(manifest, "work_size", path)
    _pair(manifest, "source_size", path)
    sha = manifest.get("tensors_sha256")
    if sha is not None and not isinstance(sha, str):
        raise RunFolderError(f"{str(path)!r} is damaged: 'tensors_sha256' is {sha!r}, expected a string")
    tensors = read_safetensors_checked(
        resolve_inside(out, manifest.get("tensors"), source=path),
        sha256=sha,
        expected={
            "masks": ((n, h, w), torch.uint8),
            "centroids": ((n, h * w), torch.float32),
            "eot": ((h, w), torch.float32),
            "pre_labels": ((h, w), torch.int64),
            "post_labels": ((h, w), torch.int64),
        },
        source=path,
    )
    return manifest, tensors
