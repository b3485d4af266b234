"""Reading a run's localization back as a ``Localization`` and rewriting it after edits, with a numbered backup.

Rewrite order (each step a rename or an atomic write; ``localization.json`` — the mark of a finished
localization — lands last)::

    1. the new localization is written complete into RUN/.edit-XXXX/ (staging)
    2. RUN/backups/localization-NNN/ receives the old localization files (moved) and everything trained on the
       old concepts: manifest.json, concepts/, a1111/, samples/, generated/, history.json, loss.png
    3. the staged files are renamed into RUN/, localization.json last

So an interrupted edit leaves either the old localization complete in the backup and no finished localization in
RUN (``extract`` would localize again), or the new one complete; never a mix. Tokens trained on the old concepts
never sit next to the edited localization; their checkpoints stay in RUN/checkpoints, where ``extract --resume``
refuses them (their fingerprint covers masks and centroids).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from ..errors import InputError
from ..localize import ConceptClusters
from ..localize.eot_filter import eot_filter
from ..localize.result import Localization
from .images import upsample_masks
from .localization_files import MANIFEST, TENSORS, read_localization, save_localization

BACKUPS = "backups"
# Files of a localization (moved to the backup, replaced by the staged ones).
_LOCALIZATION_FILES = ("masks", "overlay.png", "stages.png", TENSORS)
# Outputs that belong to the concepts they were trained on (moved to the backup, not replaced).
_TRAINED_FILES = ("manifest.json", "concepts", "a1111", "samples", "generated", "history.json", "loss.png")


def load_localization(run_dir: str | Path):
    """The localization of a run folder as an in-memory ``Localization`` (and its manifest dict).

    The filter results (scores, kept) are recomputed from the saved [EOT] map and pre-clusters exactly as
    ``cluster_concepts`` computed them; the source-size masks are re-upsampled from the latent masks (what the
    mask PNGs hold).
    """
    manifest, t = read_localization(run_dir)
    masks = t["masks"].bool()  # (N, h, w)
    pre = t["pre_labels"].long()  # (h, w)
    filt = eot_filter(pre, t["eot"])  # Eq. 5 on the saved pre-clusters, as cluster_concepts ran it
    pc = manifest.get("pre_clustering", {})
    clusters = ConceptClusters(
        masks=masks,
        centroids=t["centroids"].float(),
        pre_labels=pre,
        kept=filt.kept,
        post_labels=t["post_labels"].long(),
        scores=filt.scores.float(),
        threshold=filt.threshold,
        eot=filt.eot.reshape(pre.shape).float(),
        delta=pc.get("delta"),
        pre_level=int(pc.get("level", 0)),
        levels=tuple(pc.get("levels", ())),
        messages=tuple(manifest.get("messages", ())),
        clustering=pc.get("clustering", "released"),
    )
    source_size = tuple(manifest["source_size"])
    loc = Localization(
        clusters=clusters,
        masks=upsample_masks(masks.numpy(), source_size),
        eot=t["eot"].float(),
        source_size=source_size,
        work_size=tuple(manifest["work_size"]),
        latent_hw=tuple(manifest["latent_size"]),
        self_attention_layers=int(manifest.get("self_attention_layers", 0)),
        cross_attention_layers=int(manifest.get("cross_attention_layers", 0)),
    )
    return loc, manifest


def next_backup(run_dir: str | Path) -> Path:
    """RUN/backups/localization-NNN for the next free NNN (001, 002, …)."""
    root = Path(run_dir) / BACKUPS
    taken = [int(m.group(1)) for p in root.glob("localization-*") if (m := re.fullmatch(r"localization-(\d+)", p.name))]
    return root / f"localization-{max(taken, default=0) + 1:03d}"


def rewrite_localization(
    run_dir: str | Path, loc, image: Image.Image, manifest: dict[str, Any], edits: list[str]
) -> Path:
    """Replace RUN's localization by ``loc`` (see the module docstring) and return the backup folder.

    ``manifest`` is the old localization manifest: its image, model and config entries are kept (so that
    ``extract`` with the same image and options reuses the edited localization); ``edits`` are appended to its
    ``"edits"`` list. The caller holds the run's lock (:func:`conceptexpress.io.lock.run_lock`).
    """
    run = Path(run_dir)
    if not (run / MANIFEST).is_file():
        raise InputError(f"{str(run)!r} holds no finished localization (no {MANIFEST}); run `conceptexpress localize`")
    keep = {k: v for k, v in manifest.items() if k in ("image", "image_sha256", "model", "config")}
    keep["edits"] = [*manifest.get("edits", []), *edits]
    staging = Path(tempfile.mkdtemp(prefix=".edit-", dir=run))
    try:
        # 1. Stage the new localization, complete.
        save_localization(loc, image, staging, meta=keep)
        # 2. Back up the old one and what was trained on it. RUN's marker leaves first (RUN stops looking
        # finished) and becomes the backup's marker last (the backup looks finished only once it is).
        backup = next_backup(run)
        backup.mkdir(parents=True)
        pending = backup / f".pending-{MANIFEST}"
        (run / MANIFEST).replace(pending)
        for name in (*_LOCALIZATION_FILES, *_TRAINED_FILES):
            if (run / name).exists():
                (run / name).replace(backup / name)
        pending.replace(backup / MANIFEST)
        # 3. Move the new files in, the marker last.
        for name in _LOCALIZATION_FILES:
            (staging / name).replace(run / name)
        (staging / MANIFEST).replace(run / MANIFEST)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return backup
