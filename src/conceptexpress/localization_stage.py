"""The localization stage of a run folder: photo → localization files (paper §3.2), reused, edited, drawn.

``conceptexpress localize`` is :func:`localize_run`; ``extract`` calls :func:`localization_of` (the folder's
localization when it was made from the same photo, model, options and masks, else a new one); ``conceptexpress
edit`` and the web UI read one back with :func:`load_localization` and replace it with
:func:`rewrite_localization`. The files and their rules are :class:`~conceptexpress.io.run_folder.RunFolder`'s;
this stage runs the model (:class:`~conceptexpress.attention.localizer.ConceptLocalizer`) and draws the overlay
and stages pictures (:mod:`conceptexpress.viz`), which ``io/`` never does.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from PIL import Image

from .attention.localizer import ConceptLocalizer
from .config import LocalizeConfig, ModelConfig, RunConfig, config_dict
from .errors import RunFolderError
from .io.images import load_image, upsample_masks
from .io.masks import MaskFolder, read_mask_folder
from .io.run_folder import RunFolder, file_sha256
from .localize import ConceptClusters
from .localize.eot_filter import eot_filter
from .localize.result import Localization
from .models import load_pipeline
from .viz import overlay_concepts, stages_figure

__all__ = [
    "Photo", "load_localization", "localization_of", "localization_pictures", "localize_run", "localize_to_folder",
    "rewrite_localization", "save_localization",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Photo:
    """The checked inputs of one run: the decoded photo, its path and SHA-256, the user's masks (or None)."""

    image: Image.Image  # RGB
    path: Path
    sha256: str
    user_masks: MaskFolder | None

    @classmethod
    def open(cls, image_path: str | Path, masks: str | Path | None = None) -> Photo:
        """Decode and check the photo (:func:`~conceptexpress.io.images.load_image`) and the mask folder
        (:func:`~conceptexpress.io.masks.read_mask_folder`, at the photo's size) before anything is written."""
        image = load_image(image_path)
        user_masks = read_mask_folder(masks, image.size) if masks is not None else None
        return cls(image, Path(image_path), file_sha256(image_path), user_masks)

    @property
    def masks_sha256(self) -> str | None:
        return self.user_masks.sha256 if self.user_masks is not None else None


def localization_pictures(loc: Localization, image: Image.Image) -> dict[str, Image.Image]:
    """The pictures of a localization: ``{RunFolder.OVERLAY: …, RunFolder.STAGES: …}`` (RGB)."""
    clusters = loc.clusters
    return {
        RunFolder.OVERLAY: overlay_concepts(image, loc.masks),
        RunFolder.STAGES: stages_figure(image, clusters.pre_labels.numpy(), clusters.kept.numpy(),
                                        clusters.post_labels.numpy()),
    }


def save_localization(loc: Localization, image: Image.Image, out_dir: str | Path, *,
                      meta: dict[str, Any]) -> dict[str, Any]:
    """Write ``loc``'s files into ``out_dir`` with its pictures of ``image`` (the RGB photo) and return the
    manifest dict (:meth:`RunFolder.write_localization <conceptexpress.io.run_folder.RunFolder.write_localization>`);
    ``meta``: extra JSON-ready entries (image path, model, resolved config)."""
    return RunFolder(out_dir).write_localization(loc, localization_pictures(loc, image), meta=meta)


def rewrite_localization(run_dir: str | Path, loc: Localization, image: Image.Image, manifest: dict[str, Any],
                         edits: list[str]) -> Path:
    """Replace a run's localization by the edited ``loc`` (drawn on ``image``); returns the backup folder of the
    old one (:meth:`RunFolder.rewrite_localization <conceptexpress.io.run_folder.RunFolder.rewrite_localization>`).
    The caller holds the run's lock."""
    return RunFolder(run_dir).rewrite_localization(loc, localization_pictures(loc, image), manifest, edits)


def load_localization(run_dir: str | Path) -> tuple[Localization, dict[str, Any]]:
    """The localization of a run folder as an in-memory ``Localization`` (and its manifest dict).

    The filter results (scores, kept) are recomputed from the saved [EOT] map and pre-clusters exactly as
    ``cluster_concepts`` computed them; the source-size masks are re-upsampled from the latent masks (what the
    mask PNGs hold).
    """
    manifest, t = RunFolder(run_dir).read_localization()
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


def localize_to_folder(
    pipe, image, image_path, out: Path, model: ModelConfig, localize: LocalizeConfig, *, image_sha: str | None = None,
    user_masks: MaskFolder | None = None,
):
    """Localize ``image`` and write the localization folder (what `localize` and `extract` share).

    Returns (manifest, Localization). The manifest records the image path and SHA-256, the model and the
    resolved configs, which is what lets `extract` reuse a localization instead of recomputing it.
    With ``user_masks`` (:func:`~conceptexpress.io.masks.read_mask_folder`) the concepts are the user's masks and
    clustering is skipped (:meth:`ConceptLocalizer.from_masks`); the manifest records ``"source": "user masks"``,
    the files and their SHA-256.
    """
    localizer = ConceptLocalizer(pipe, localize)
    loc = localizer.from_masks(image, user_masks.masks) if user_masks is not None else localizer(image)
    source: dict[str, Any] = {"source": "localization"}
    if user_masks is not None:
        source = {
            "source": "user masks",
            "masks_dir": str(user_masks.folder.resolve()),
            "mask_files": list(user_masks.files),
            "masks_sha256": user_masks.sha256,
        }
    meta = {
        **source,
        "image": str(Path(image_path).resolve()),
        "image_sha256": image_sha or file_sha256(image_path),
        "model": model.model,
        "config": config_dict(model, localize),
    }
    return save_localization(loc, image, out, meta=meta), loc


def localize_run(
    image_path: str | Path,
    out_dir: str | Path,
    *,
    model: ModelConfig | None = None,
    localize: LocalizeConfig | None = None,
    pipe=None,
    overwrite: bool = False,
    wait: bool = False,
):
    """``conceptexpress localize``: localize one photo into ``out_dir`` (locked, as ``extract`` locks it).

    A folder that holds a trained run keeps it consistent: a new localization under its tokens would make a mix,
    so it is refused (:class:`~conceptexpress.errors.OutputError`) unless ``overwrite=True``, which clears the
    run's trained outputs first. Returns ``(manifest, Localization)`` like :func:`localize_to_folder`.
    """
    model = model or ModelConfig()
    localize = localize or LocalizeConfig()
    photo = Photo.open(image_path)
    run = RunFolder(out_dir).create()
    with run.lock(wait=wait):
        run.start_localization(overwrite=overwrite)
        if pipe is None:
            pipe = load_pipeline(model)
        return localize_to_folder(pipe, photo.image, photo.path, run.path, model, localize, image_sha=photo.sha256)


def localization_of(pipe, photo: Photo, run: RunFolder, config: RunConfig):
    """(localization manifest, tensors) of ``run``: read back when image, model, config and user masks match, else
    computed (from the user's masks when given).

    A damaged localization (a file truncated, garbled, of another SHA-256 or shape) is derived state: it is
    recomputed, with a warning naming the file.
    """
    if run.localization_matches(image_sha256=photo.sha256, model=config.model.model, localize=config.localize,
                                masks_sha256=photo.masks_sha256):
        try:
            found = run.read_localization()
        except RunFolderError as exc:
            logger.warning("%s; recomputing the localization", exc)
        else:
            logger.info("reusing the localization in %s", run.path)
            return found
    localize_to_folder(pipe, photo.image, photo.path, run.path, config.model, config.localize, image_sha=photo.sha256,
                       user_masks=photo.user_masks)
    return run.read_localization()
