"""The run folder of one photo, as one object: :class:`RunFolder`.

Every file name of a run is a constant of :class:`RunFolder` (README, "What `extract` writes", is tested against
them); every file is read through the checks of :mod:`.checked` (docs/inputs.md, "Run-folder guarantees");
the manifest has one writer (:meth:`RunFolder.write_manifest` of a :meth:`RunManifest.build
<conceptexpress.io.manifest.RunManifest.build>`); and the rules that keep a folder one consistent run live here:
its lock, the option comparison of a rerun (:meth:`~RunFolder.start_run`), the reuse of a matching localization
and the numbered backup an edit leaves (:meth:`~RunFolder.rewrite_localization`).

    run = RunFolder("outputs/coffee")
    with run.lock(wait=False):                     # one process per folder (io/lock.py)
        manifest = run.read_manifest()             # checked; RunFolderError names a damaged file

Nothing here draws a picture (the localization stage hands its overlay and stages pictures in) or imports
diffusers or transformers. The token files' formats are :mod:`conceptexpress.export`; a run's tokens are put
into a pipeline by :mod:`conceptexpress.embeddings`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save as save_tensors

from ..config import LocalizeConfig, config_dict
from ..errors import InputError, OutputError, RunFolderError
from .atomic import atomic_save_image, atomic_write_bytes, atomic_write_json, ensure_output_dir
from .checked import file_sha256, read_json_checked, read_safetensors_checked, resolve_inside
from .lock import LOCK_NAME, run_lock
from .manifest import RUN_FORMAT, RUN_FORMAT_PREFIX, RunManifest, token_names, versions
from .run_options import check_run_options, option_differences, options_of_manifest

__all__ = [
    "A1111_KEY", "RUN_FORMAT", "RunFolder", "RunManifest", "file_sha256", "read_json_checked", "read_localization",
    "read_manifest", "read_safetensors_checked", "resolve_inside", "token_names", "versions",
]

logger = logging.getLogger(__name__)

A1111_KEY = "emb_params"  # the tensor key of an SD 1.x / 2.x A1111 / ComfyUI embedding file (conceptexpress.export)


class RunFolder:
    """A run folder (one photo): its file names, checked readers and writers, its lock, and its run's rules.

    Cheap to make (nothing is read or created until a method is called). ``run / name`` is the path of a file
    of the run (a :class:`~pathlib.Path`).
    """

    # What `localize` writes (a localization; `extract` reuses it when image, model and options match):
    MASKS_DIR: ClassVar[str] = "masks"  # masks/concept_01.png …: one mask per concept at the photo's size (L, 0/255)
    OVERLAY: ClassVar[str] = "overlay.png"  # every concept a coloured, numbered region (paper Fig. 3, left)
    STAGES: ClassVar[str] = "stages.png"  # pre-clustering | [EOT] filtering | post-clustering
    LOCALIZATION_TENSORS: ClassVar[str] = "localization.safetensors"  # latent masks m_i, centroids f_i, [EOT] map, labels
    LOCALIZATION: ClassVar[str] = "localization.json"  # N, file names, sizes, model, config, versions; written LAST
    # What `extract` adds (token learning and export):
    CONCEPTS_DIR: ClassVar[str] = "concepts"  # <stem>.safetensors: diffusers file (SDXL: the {clip_l, clip_g} file)
    A1111_DIR: ClassVar[str] = "a1111"  # <stem>.safetensors {"emb_params": (V, D)}: A1111 / ComfyUI (SD 1.x / 2.x)
    SAMPLES_DIR: ClassVar[str] = "samples"  # <stem>_00.png …: each concept alone and all together
    LOSS_CURVE: ClassVar[str] = "loss.png"  # the loss curve
    HISTORY: ClassVar[str] = "history.json"  # one record per training step (loss terms, phase)
    SOURCE_STEM: ClassVar[str] = "source"  # source.<ext>: the photo's bytes, so a run never reads outside its folder
    CHECKPOINTS_DIR: ClassVar[str] = "checkpoints"  # resumable training state (--resume)
    PIPELINE_DIR: ClassVar[str] = "pipeline"  # --method bas-ft: the fine-tuned diffusers pipeline (the base model)
    OPTIONS: ClassVar[str] = "run.json"  # the run's options (image, model, method, configs), written first
    MANIFEST: ClassVar[str] = "manifest.json"  # tokens, files, model, configs, versions; "complete": true LAST
    # What later commands write:
    GENERATED_DIR: ClassVar[str] = "generated"  # `generate`: <prompt>/<seed>.png
    BACKUPS_DIR: ClassVar[str] = "backups"  # `edit`: backups/localization-NNN/, the localization it replaced
    LOCK: ClassVar[str] = LOCK_NAME  # the OS lock file (io/lock.py)

    # Everything `extract` writes, in README order (tests/test_readme.py checks the README lists exactly these).
    EXTRACT_OUTPUTS: ClassVar[tuple[str, ...]] = (
        MASKS_DIR, OVERLAY, STAGES, LOCALIZATION_TENSORS, LOCALIZATION, CONCEPTS_DIR, A1111_DIR, SAMPLES_DIR,
        LOSS_CURVE, HISTORY, SOURCE_STEM, CHECKPOINTS_DIR, PIPELINE_DIR, OPTIONS, MANIFEST,
    )
    # A localization's files beside its marker LOCALIZATION (replaced together by an edit).
    LOCALIZATION_FILES: ClassVar[tuple[str, ...]] = (MASKS_DIR, OVERLAY, STAGES, LOCALIZATION_TENSORS)
    # What belongs to the concepts it was trained on (moved into an edit's backup with the old localization).
    TRAINED_ON_CONCEPTS: ClassVar[tuple[str, ...]] = (
        MANIFEST, CONCEPTS_DIR, A1111_DIR, SAMPLES_DIR, GENERATED_DIR, HISTORY, LOSS_CURVE,
    )
    # What a run trained: removed (renamed away first) before a new run starts in the same folder.
    TRAINED_OUTPUTS: ClassVar[tuple[str, ...]] = (
        MANIFEST, OPTIONS, CHECKPOINTS_DIR, CONCEPTS_DIR, A1111_DIR, SAMPLES_DIR, GENERATED_DIR, HISTORY, LOSS_CURVE,
        PIPELINE_DIR,
    )
    _OLD_RUN_PREFIX: ClassVar[str] = ".old-run-"  # a cleared run, renamed away before it is deleted
    _EDIT_PREFIX: ClassVar[str] = ".edit-"  # an edited localization, staged complete before it moves in

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __fspath__(self) -> str:
        return os.fspath(self.path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def create(self) -> RunFolder:
        """Create the folder (with parents) and prove it writable (:func:`~.atomic.ensure_output_dir`)."""
        ensure_output_dir(self.path)
        return self

    def lock(self, *, wait: bool = False, poll: float = 0.2, timeout: float | None = None):
        """Hold the folder's OS lock for a ``with`` block (:func:`conceptexpress.io.lock.run_lock`).

        Raises:
            RunLockedError: another live process holds it (and ``wait`` is false or ``timeout`` passed).
        """
        return run_lock(self.path, wait=wait, poll=poll, timeout=timeout)

    # ------------------------------------------------------------------ names
    @classmethod
    def mask_name(cls, i: int) -> str:
        """File of concept ``i`` (0-based) — 1-based in names, like the numbers on the overlay."""
        return f"{cls.MASKS_DIR}/concept_{i + 1:02d}.png"

    @classmethod
    def source_name(cls, image_path: str | Path) -> str:
        """``source.<ext>`` for a photo (its extension lower-cased, ``.img`` when it has none)."""
        suffix = Path(image_path).suffix.lower()
        return cls.SOURCE_STEM + (suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ".img")

    # ------------------------------------------------------------------ the manifest
    def read_manifest(self, *, require_complete: bool = True) -> RunManifest:
        """``RUN/manifest.json``, checked.

        Raises:
            InputError: the folder or manifest is missing, or (with ``require_complete``) the run did not finish
                (``"complete"`` absent or false). RunFolderError (an InputError): the manifest is not valid JSON,
                not a run manifest, has an entry of the wrong type, lists no tokens or one twice, or names a file
                outside the run folder.
        """
        run, path = self.path, self / self.MANIFEST
        if not run.is_dir():
            raise InputError(f"run folder {str(run)!r} does not exist or is not a folder")
        if not path.is_file():
            raise InputError(f"{str(run)!r} is not a finished run (no {self.MANIFEST}); train its tokens first")
        data = read_json_checked(path)
        if (
            require_complete
            and str(data.get("format", "")).startswith(RUN_FORMAT_PREFIX)
            and data.get("complete") is not True
            and isinstance(data.get("complete", False), bool)  # another type: a damaged manifest (from_dict)
        ):
            raise InputError(
                f"run {str(run)!r} is incomplete (manifest has \"complete\": {data.get('complete', 'absent')}); "
                "finish or rerun the training"
            )
        manifest = RunManifest.from_dict(data, source=str(path))
        for rel in manifest.files():  # no entry may lead out of the folder, whether or not the reader uses it
            resolve_inside(run, rel, source=path)
        return manifest

    def write_manifest(self, manifest: RunManifest) -> Path:
        """Write ``RUN/manifest.json`` atomically: the last file of a run (made by :meth:`RunManifest.build`)."""
        return atomic_write_json(self / self.MANIFEST, manifest.as_dict())

    # ------------------------------------------------------------------ one run per folder
    def trained_outputs(self) -> list[str]:
        """What a run trained that is present (``run.json`` alone is no run yet: nothing could be mixed)."""
        return [name for name in self.TRAINED_OUTPUTS if name != self.OPTIONS and (self / name).exists()]

    def read_options(self) -> dict[str, Any] | None:
        """The options of the run here: ``run.json``, else those of a finished ``manifest.json`` written before
        ``run.json`` existed, else None (no run here).

        Raises:
            RunFolderError: ``run.json`` (or, without it, ``manifest.json``) is damaged or of the wrong schema.
        """
        path = self / self.OPTIONS
        if path.is_file():
            return check_run_options(read_json_checked(path), source=str(path))
        path = self / self.MANIFEST
        if not path.is_file():
            return None
        return options_of_manifest(RunManifest.from_dict(read_json_checked(path), source=str(path)))

    def start_run(self, options: Mapping[str, Any], *, resume: bool, overwrite: bool) -> bool:
        """Make the folder hold the run of ``options`` (:func:`~.run_options.run_options`) only: a resume of the
        run here, or a new one. Returns whether to resume.

        A run here made with other options is refused unless ``overwrite`` (then replaced, never resumed). A new
        run removes what the previous one trained (:meth:`clear`); a resume redraws the samples. Writes
        ``run.json``.

        Raises:
            OutputError: the run here was made with other options and ``overwrite`` is false.
            RunFolderError: its ``run.json`` is damaged and ``overwrite`` is false.
        """
        # A run.json beside nothing trained (the model did not load, say) is no run yet: nothing could be mixed.
        try:
            old = self.read_options() if self.trained_outputs() else None
        except RunFolderError as exc:
            if not overwrite:
                raise RunFolderError(f"{exc}; pass --overwrite (overwrite=True) to replace the run in "
                                     f"'{self.path}'") from None
            logger.warning("%s; replacing the run (--overwrite)", exc)
            old = {}
        diffs = option_differences(old, options) if old else []
        if old is not None and (diffs or old == {}):
            if not overwrite:
                raise OutputError(
                    f"run folder '{self.path}' holds a run made with other options ({'; '.join(diffs)}); pass "
                    "--overwrite (overwrite=True) to replace it, or choose another --out"
                )
            logger.warning("replacing the run in %s, made with other options (%s)", self.path,
                           "; ".join(diffs) or "unknown")
            resume = False
        self.clear(self.TRAINED_OUTPUTS if not resume else (self.SAMPLES_DIR,))
        atomic_write_json(self / self.OPTIONS, dict(options))
        return resume

    def start_localization(self, *, overwrite: bool) -> None:
        """Before a new localization (``conceptexpress localize``): a trained run here would not match it, so it
        is refused unless ``overwrite``, which removes the run's trained outputs.

        Raises:
            OutputError: the folder holds a trained run and ``overwrite`` is false.
        """
        trained = self.trained_outputs()
        if trained and not overwrite:
            raise OutputError(
                f"run folder '{self.path}' holds a trained run ({', '.join(trained)}); a new localization would not "
                "match its tokens: pass --overwrite (overwrite=True) to replace the run, or choose another --out"
            )
        self.clear(self.TRAINED_OUTPUTS)

    def clear(self, names: Iterable[str]) -> list[str]:
        """Remove ``names`` (files or folders): all are renamed into a hidden folder inside the run first
        (``manifest.json`` first, so the folder stops looking finished at once), then that folder is deleted.

        Leftovers of an interrupted earlier clear are deleted too. Returns the names that were present.

        Raises:
            OutputError: a name cannot be moved.
        """
        run = self.path
        for stale in run.glob(f"{self._OLD_RUN_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        present = [n for n in dict.fromkeys(names) if (run / n).exists() or (run / n).is_symlink()]
        if not present:
            return []
        trash = Path(tempfile.mkdtemp(prefix=self._OLD_RUN_PREFIX, dir=run))
        try:
            for name in sorted(present, key=lambda n: n != self.MANIFEST):
                os.replace(run / name, trash / name)
        except OSError as exc:
            raise OutputError(f"cannot clear the old run in '{run}': {name}: {exc.strerror or exc}") from None
        finally:
            with contextlib.suppress(OSError):
                shutil.rmtree(trash, ignore_errors=True)
        return present

    def keep_edits(self, *, image_sha256: str, model: str, localize: LocalizeConfig, masks_sha256: str | None,
                   overwrite: bool) -> None:
        """An edited localization (``conceptexpress edit``) is the user's work: options that would recompute it
        (another image, model, LocalizeConfig or masks) are refused unless ``overwrite``, before the model loads.

        Raises:
            OutputError: the localization here is edited, would be recomputed, and ``overwrite`` is false.
        """
        path = self / self.LOCALIZATION
        if not path.is_file():
            return
        try:
            edits = read_json_checked(path).get("edits")
        except RunFolderError:
            return  # damaged: recomputed with a warning (localization_matches)
        if not edits or self.localization_matches(image_sha256=image_sha256, model=model, localize=localize,
                                                  masks_sha256=masks_sha256):
            return
        if not overwrite:
            raise OutputError(
                f"'{self.path}' holds an edited localization ({len(edits)} edits) made with other options; these "
                "options would recompute it and lose the edits: rerun with the options it was made with (its "
                f"{self.LOCALIZATION}), or pass --overwrite to recompute it"
            )
        logger.warning("recomputing the edited localization in %s with other options (--overwrite): its edits are "
                       "dropped", self.path)

    # ------------------------------------------------------------------ the localization
    def localization_matches(self, *, image_sha256: str, model: str, localize: LocalizeConfig,
                             masks_sha256: str | None = None) -> bool:
        """Whether the finished localization here was made from this image (SHA-256), model, LocalizeConfig and
        user masks (None: automatic), so a run can reuse it. A damaged ``localization.json`` is no match (logged)."""
        path = self / self.LOCALIZATION
        if not path.is_file():
            return False
        try:
            meta = read_json_checked(path)
        except RunFolderError as exc:
            logger.warning("%s; recomputing the localization", exc)
            return False
        config = meta.get("config")
        return (
            meta.get("image_sha256") == image_sha256
            and meta.get("model") == model
            and isinstance(config, dict)
            and config.get("LocalizeConfig") == config_dict(localize)["LocalizeConfig"]
            and meta.get("masks_sha256") == masks_sha256  # user masks: the same files; automatic: none
        )

    def write_localization(self, loc, pictures: Mapping[str, Image.Image], *, meta: Mapping[str, Any]) -> dict[str, Any]:
        """Write a localization's files, ``localization.json`` last, and return that manifest (a dict).

        ``loc`` is a :class:`conceptexpress.localize.result.Localization`; ``pictures`` the drawn
        ``{OVERLAY: …, STAGES: …}`` (the localization stage draws them, :mod:`conceptexpress.viz`); ``meta``
        extra JSON-ready entries (image path and SHA-256, model, resolved config). Every file is written
        atomically and the marker after all others, so an interrupted write leaves no finished-looking folder.
        """
        assert set(pictures) == {self.OVERLAY, self.STAGES}, sorted(pictures)
        out = ensure_output_dir(self.path)
        # Invalidate a previous localization first: until the new marker lands, the folder must not look complete.
        (out / self.LOCALIZATION).unlink(missing_ok=True)
        (out / self.MASKS_DIR).mkdir(exist_ok=True)
        for stale in (out / self.MASKS_DIR).glob("concept_*.png"):
            stale.unlink()
        clusters = loc.clusters
        names = [self.mask_name(i) for i in range(loc.num_concepts)]
        for name, mask in zip(names, loc.masks):
            atomic_save_image(Image.fromarray(mask.astype(np.uint8) * 255, mode="L"), out / name)
        for name in (self.OVERLAY, self.STAGES):
            atomic_save_image(pictures[name], out / name)
        tensors = {
            "masks": clusters.masks.to(torch.uint8).contiguous(),  # (N, h, w) 0/1
            "centroids": clusters.centroids.float().contiguous(),  # (N, h·w)
            "eot": loc.eot.float().contiguous(),  # (h, w) raw [EOT] cross-attention
            "pre_labels": clusters.pre_labels.contiguous(),  # (h, w)
            "post_labels": clusters.post_labels.contiguous(),  # (h, w), -1 = background
        }
        data = save_tensors(tensors, metadata={"format": "conceptexpress-localization-1"})
        atomic_write_bytes(out / self.LOCALIZATION_TENSORS, data)
        manifest = {
            "num_concepts": loc.num_concepts,
            "masks": names,
            "overlay": self.OVERLAY,
            "stages": self.STAGES,
            "tensors": self.LOCALIZATION_TENSORS,
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
        atomic_write_json(out / self.LOCALIZATION, manifest)
        return manifest

    def read_localization(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """The finished localization here: (manifest, tensors), every entry checked.

        ``localization.json`` must have the schema :meth:`write_localization` writes; the files it names must lie
        inside the folder; the tensor file must have the SHA-256 it records (when it records one: older folders
        do not), a readable header, and tensors of the shapes and dtypes the manifest implies: ``masks`` (N, h, w)
        uint8 0/1, ``centroids`` (N, h·w) float32, ``eot`` (h, w) float32, ``pre_labels`` / ``post_labels``
        (h, w) int64 (-1 = background).

        Raises:
            InputError: the folder holds no finished localization (no ``localization.json``).
            RunFolderError: (an InputError) a file is damaged, malformed, or named outside the folder; the
                message names it.
        """
        out, path = self.path, self / self.LOCALIZATION
        if not path.is_file():
            raise InputError(f"{str(out)!r} holds no finished localization (no {self.LOCALIZATION}); run "
                             "`conceptexpress localize`")
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

    def next_backup(self) -> Path:
        """``RUN/backups/localization-NNN`` for the next free NNN (001, 002, …)."""
        root = self / self.BACKUPS_DIR
        taken = [int(m.group(1)) for p in root.glob("localization-*")
                 if (m := re.fullmatch(r"localization-(\d+)", p.name))]
        return root / f"localization-{max(taken, default=0) + 1:03d}"

    def rewrite_localization(self, loc, pictures: Mapping[str, Image.Image], manifest: Mapping[str, Any],
                             edits: list[str]) -> Path:
        """Replace the localization here by the edited ``loc`` and return the backup folder of the old one.

        ``manifest`` is the old localization manifest: its image, model and config entries are kept (so that
        ``extract`` with the same image and options reuses the edited localization); ``edits`` are appended to
        its ``"edits"`` list; ``pictures`` as for :meth:`write_localization`. The caller holds the lock.
        Order (each step a rename or an atomic write)::

            1. the new localization is written complete into RUN/.edit-XXXX/ (staging)
            2. RUN/backups/localization-NNN/ receives the old localization's files (moved) and everything
               trained on the old concepts (TRAINED_ON_CONCEPTS): manifest.json, concepts/, a1111/, …
            3. the staged files are renamed into RUN/, localization.json last

        So an interrupted edit leaves either the old localization complete in the backup and no finished
        localization here (``extract`` would localize again), or the new one complete; never a mix. Checkpoints
        trained on the old concepts stay in RUN/checkpoints, where ``extract --resume`` refuses them (their
        fingerprint covers masks and centroids).

        Raises:
            InputError: no finished localization here.
        """
        run, marker = self.path, self.LOCALIZATION
        if not (run / marker).is_file():
            raise InputError(f"{str(run)!r} holds no finished localization (no {marker}); run `conceptexpress localize`")
        keep = {k: v for k, v in manifest.items() if k in ("image", "image_sha256", "model", "config")}
        keep["edits"] = [*manifest.get("edits", []), *edits]
        staging = Path(tempfile.mkdtemp(prefix=self._EDIT_PREFIX, dir=run))
        try:
            # 1. Stage the new localization, complete.
            RunFolder(staging).write_localization(loc, pictures, meta=keep)
            # 2. Back up the old one and what was trained on it. RUN's marker leaves first (RUN stops looking
            # finished) and becomes the backup's marker last (the backup looks finished only once it is).
            backup = self.next_backup()
            backup.mkdir(parents=True)
            pending = backup / f".pending-{marker}"
            (run / marker).replace(pending)
            for name in (*self.LOCALIZATION_FILES, *self.TRAINED_ON_CONCEPTS):
                if (run / name).exists():
                    (run / name).replace(backup / name)
            pending.replace(backup / marker)
            # 3. Move the new files in, the marker last.
            for name in self.LOCALIZATION_FILES:
                (staging / name).replace(run / name)
            (staging / marker).replace(run / marker)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return backup

    # ------------------------------------------------------------------ what training leaves
    def write_training_record(self, history: list[dict[str, Any]], loss_curve: Image.Image) -> None:
        """``history.json`` (one record per step) and ``loss.png`` (its picture, drawn by the trainer)."""
        atomic_write_json(self / self.HISTORY, history)
        atomic_save_image(loss_curve, self / self.LOSS_CURVE)

    def copy_source(self, image_path: str | Path, sha256: str) -> str:
        """Copy the photo's bytes to ``RUN/source.<ext>`` (a run folder is self-contained: evaluation never reads
        a path outside it); returns the name.

        Raises:
            InputError: the photo's SHA-256 is no longer ``sha256`` (it changed while the run worked on it).
        """
        data = Path(image_path).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise InputError(f"the photo {str(image_path)!r} changed while the run was working on it; run again")
        name = self.source_name(image_path)
        for stale in self.path.glob(f"{self.SOURCE_STEM}.*"):
            if stale.name != name:
                stale.unlink()
        atomic_write_bytes(self / name, data)
        return name

    def write_sample(self, image: Image.Image, stem: str, k: int) -> str:
        """``samples/<stem>_<k>.png`` (k two digits); returns the name relative to the run."""
        (self / self.SAMPLES_DIR).mkdir(exist_ok=True)
        rel = f"{self.SAMPLES_DIR}/{stem}_{k:02d}.png"
        atomic_save_image(image, self / rel)
        return rel

    def write_pipeline(self, pipe) -> str:
        """Save a (fine-tuned) diffusers pipeline as ``RUN/pipeline/`` (safetensors) through a staging folder, so a
        crash never leaves a half-written model there; returns the name."""
        staging = self / f".{self.PIPELINE_DIR}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        pipe.save_pretrained(staging, safe_serialization=True)
        shutil.rmtree(self / self.PIPELINE_DIR, ignore_errors=True)
        staging.rename(self / self.PIPELINE_DIR)
        return self.PIPELINE_DIR


def _pair(manifest: Mapping[str, Any], key: str, source: Path) -> tuple[int, int]:
    value = manifest.get(key)
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                               for v in value)):
        raise RunFolderError(f"{str(source)!r} is damaged: {key!r} is {value!r}, expected [height, width] integers")
    return value[0], value[1]


def read_manifest(run_dir: str | Path, *, require_complete: bool = True) -> RunManifest:
    """:meth:`RunFolder.read_manifest` of ``run_dir`` (the function the rest of the package calls)."""
    return RunFolder(run_dir).read_manifest(require_complete=require_complete)


def read_localization(run_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """:meth:`RunFolder.read_localization` of ``run_dir`` (public API: ``conceptexpress.read_localization``)."""
    return RunFolder(run_dir).read_localization()

