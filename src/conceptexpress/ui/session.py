"""The browser app's logic without gradio: one ``Studio`` per process, one ``Session`` per browser tab.

- The model is loaded once (``Studio.load``) and used by one task at a time (``Studio.using_model``):
  localization swaps attention processors and training splices tokens, so two tabs must never share it at
  once; a tab that has to wait is told so.
- Each session owns a run folder ``WORKDIR/runs/<random id>/`` (the same layout as ``conceptexpress extract``),
  locked with :meth:`RunFolder.lock <conceptexpress.io.run_folder.RunFolder.lock>` while it is written, so tabs never touch each other's runs.
- The browser never names a path: photos arrive as uploads (size, type and the CLI's image checks apply) or as
  the built-in example, and downloads are zips the app writes under WORKDIR.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..attention.localizer import ConceptLocalizer
from ..config import LocalizeConfig, ModelConfig, RunConfig, TrainConfig
from ..errors import ConceptExpressError, ConfigError, InputError
from ..extract import SampleConfig, extract
from ..generate import GenerateConfig, expand_prompt, generate_from_run, prompt_folders
from ..io.atomic import ensure_output_dir
from ..io.checked import read_json_checked
from ..io.images import load_image
from ..io.run_folder import RunFolder, read_manifest
from ..learn.checkpoint import save_checkpoint
from ..localization_stage import localize_to_folder, rewrite_localization
from ..localize.edit import apply_edits
from ..models import load_pipeline

logger = logging.getLogger(__name__)

DEFAULT_MAX_UPLOAD_MB = 20.0  # a 24 Mpx JPEG is ~10 MB; the pixel limit of io.images still applies after this
EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "coffee.jpg"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
# What the downloaded zip holds (relative to the run folder): tokens in both formats, manifest, masks, pictures.
ZIP_CONTENT = (RunFolder.MANIFEST, RunFolder.CONCEPTS_DIR, RunFolder.A1111_DIR, RunFolder.MASKS_DIR, RunFolder.LOCALIZATION,
               RunFolder.LOCALIZATION_TENSORS, RunFolder.OVERLAY, RunFolder.STAGES, RunFolder.LOSS_CURVE, RunFolder.HISTORY,
               RunFolder.SAMPLES_DIR, RunFolder.GENERATED_DIR)
# What a new photo removes from the tab's run folder (its pictures and masks are overwritten by the next localization).
_CLEARED = (RunFolder.LOCALIZATION, RunFolder.MANIFEST, RunFolder.CHECKPOINTS_DIR, RunFolder.BACKUPS_DIR,
            RunFolder.CONCEPTS_DIR, RunFolder.A1111_DIR, RunFolder.SAMPLES_DIR, RunFolder.GENERATED_DIR)


class TrainingCancelled(Exception):
    """Raised from the training callback when the user pressed Cancel (after saving a checkpoint)."""


@dataclass(frozen=True)
class StudioConfig:
    """What ``conceptexpress ui`` serves."""

    model: ModelConfig = field(default_factory=ModelConfig)
    workdir: Path = Path("outputs") / "ui"  # one run folder per browser session below WORKDIR/runs
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB  # uploads larger than this are refused before decoding
    example: Path | None = EXAMPLE  # the photo behind "use the example" (None or missing: no example)
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)


class Studio:
    """Process-wide state: the model (loaded once), the sessions and the one-task-at-a-time model lock."""

    def __init__(self, config: StudioConfig | None = None, pipe=None):
        self.config = config or StudioConfig()
        self.pipe = pipe
        self._model_lock = threading.Lock()
        self._busy_with = ""  # what holds the model, for the waiting message
        self._sessions: dict[str, Session] = {}
        self._sessions_lock = threading.Lock()

    def load(self) -> None:
        if self.pipe is None:

            self.pipe = load_pipeline(self.config.model)

    @contextmanager
    def using_model(self, task: str, on_wait: Callable[[str], None] | None = None) -> Iterator[Any]:
        """Hold the model for ``task``; if another tab holds it, tell ``on_wait`` and wait."""
        self.load()
        if not self._model_lock.acquire(blocking=False):
            if on_wait is not None:
                on_wait(f"waiting: the model is busy ({self._busy_with or 'another tab'}); this starts when it is free")
            self._model_lock.acquire()
        self._busy_with = task
        try:
            yield self.pipe
        finally:
            self._busy_with = ""
            self._model_lock.release()

    def new_session(self) -> Session:
        sid = uuid.uuid4().hex[:16]
        session = Session(self, sid, (self.config.workdir / "runs" / sid).resolve())
        with self._sessions_lock:
            self._sessions[sid] = session
        return session

    def session(self, sid: str | None) -> Session:
        with self._sessions_lock:
            session = self._sessions.get(sid or "")
        if session is None:
            raise InputError("no photo yet in this tab: upload one or use the example first")
        return session


@dataclass
class TrainingJob:
    """A training running in a background thread; the page polls it (``records``, ``status``, ``done``)."""

    steps: int
    records: list[dict[str, Any]] = field(default_factory=list)
    status: str = "starting"
    error: str | None = None
    manifest: dict[str, Any] | None = None
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        self.cancel_requested.set()


class Session:
    """One browser tab's run: photo → localization → edits → training → generation → zip."""

    def __init__(self, studio: Studio, sid: str, run: Path):
        self.studio, self.id, self.run = studio, sid, run
        self.image_path: Path | None = None
        self.loc = None  # Localization in memory (what the page shows)
        self.loc_manifest: dict[str, Any] | None = None
        self.attn = None  # (h·w, h·w) self-attention, computed on the first split/add
        self.job: TrainingJob | None = None
        self.train_config: TrainConfig | None = None  # of the checkpoints in the run folder

    # ------------------------------------------------------------------ 1. photo
    def set_image(self, path: str | Path) -> Path:
        """Take an uploaded file (or the example) into the run folder after the CLI's image checks."""

        if self.job is not None and not self.job.done.is_set():
            raise ConfigError("this tab is training: wait for it, or cancel it, before a new photo")
        src = Path(path)
        limit = self.studio.config.max_upload_mb
        if src.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"upload '{src.name}': not an image file (accepted: {', '.join(IMAGE_SUFFIXES)})")
        size = src.stat().st_size
        if size > limit * 1e6:
            raise InputError(f"upload '{src.name}': {size / 1e6:.1f} MB is over the {limit:g} MB limit")
        load_image(src)  # every check of the command line (not an image, truncated, too small or too large)
        ensure_output_dir(self.run)
        self._clear()
        dest = self.run / f"photo{src.suffix.lower()}"
        for old in self.run.glob("photo.*"):
            old.unlink()
        shutil.copyfile(src, dest)
        self.image_path = dest
        return dest

    def _clear(self) -> None:
        self.loc = self.loc_manifest = self.attn = None
        self.train_config = None
        for name in _CLEARED:
            p = self.run / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()

    def _require(self, what: str) -> None:
        if self.job is not None and not self.job.done.is_set():
            raise ConfigError("this tab is training: wait for it, or cancel it, first")
        if self.image_path is None:
            raise InputError("no photo yet: upload one or use the example first")
        if what in ("edit", "train") and self.loc is None:
            raise InputError("find the concepts first (Localize)")
        if what == "train" and self.loc.num_concepts == 0:
            raise InputError("no concept to train: the localization found none (try another photo)")

    # ------------------------------------------------------------------ 2. localize
    def localize(self, on_wait: Callable[[str], None] | None = None):
        """Find the concepts (paper §3.2) and write the localization into the run folder."""

        self._require("localize")
        image = load_image(self.image_path)
        with self.studio.using_model("localizing", on_wait) as pipe, RunFolder(self.run).lock():
            self._clear()
            manifest, loc = localize_to_folder(pipe, image, self.image_path, self.run, self.studio.config.model,
                                               self.studio.config.localize)
        self.loc, self.loc_manifest = loc, manifest
        return loc

    # ------------------------------------------------------------------ 3. edit
    def edit(self, *, merge: Sequence[int] = (), drop: Sequence[int] = (), split: Sequence[int] = (),
             mask=None, on_wait: Callable[[str], None] | None = None) -> list[str]:
        """Apply edits numbered as on the current overlay (1-based); rewrite the run's localization."""

        self._require("edit")
        merge, drop, split = list(merge), list(drop), list(split)
        if not (merge or drop or split or mask is not None):
            raise ConfigError("select concepts first (or draw a mask to add)")
        if len(merge) == 1:
            raise ConfigError(f"select at least two concepts to merge, got {merge[0]}")
        image = load_image(self.image_path)
        if (split or mask is not None) and self.attn is None:

            with self.studio.using_model("computing attention", on_wait) as pipe:
                self.attn = ConceptLocalizer(pipe, self.studio.config.localize).attention(image).attn
        edited, done = apply_edits(self.loc, merge=[merge] if merge else [], drop=[drop] if drop else [],
                                   split=[split] if split else [], masks=[mask] if mask is not None else [],
                                   attn=self.attn)
        with RunFolder(self.run).lock():
            rewrite_localization(self.run, edited, image, self.loc_manifest, done)
            shutil.rmtree(self.run / RunFolder.CHECKPOINTS_DIR, ignore_errors=True)  # trained on the old concepts
        self.loc = edited
        self.loc_manifest = read_json_checked(self.run / RunFolder.LOCALIZATION)
        self.train_config = None
        return done

    # ------------------------------------------------------------------ 4. train
    def start_training(self, config: TrainConfig, samples: int = 1, sample_steps: int = 20) -> TrainingJob:
        """Train in a background thread (resuming this run's checkpoint when the config is the same)."""
        self._require("train")
        if self.train_config != config:
            shutil.rmtree(self.run / RunFolder.CHECKPOINTS_DIR, ignore_errors=True)  # other options: start over
        self.train_config = config
        job = TrainingJob(steps=config.steps)
        self.job = job
        threading.Thread(target=self._train, args=(job, config, samples, sample_steps), daemon=True).start()
        return job

    def _train(self, job: TrainingJob, config: TrainConfig, samples: int, sample_steps: int) -> None:

        def on_wait(message: str) -> None:
            job.status = message

        def callback(trainer, record: dict[str, Any]) -> None:
            job.records.append(dict(record))
            job.status = f"step {record['step']}/{job.steps} · loss {record['loss']:.4f} · {record['phase']}"
            if job.cancel_requested.is_set():
                save_checkpoint(self.run / RunFolder.CHECKPOINTS_DIR, trainer.state())  # resumable from this very step
                raise TrainingCancelled

        try:
            with self.studio.using_model("training", on_wait) as pipe, RunFolder(self.run).lock():
                if job.cancel_requested.is_set():  # cancelled while waiting for the model
                    raise TrainingCancelled
                job.status = "training"
                run_config = RunConfig(
                    model=self.studio.config.model, localize=self.studio.config.localize, train=config,
                    sample=SampleConfig(samples=samples > 0, sample_count=max(samples, 1), sample_steps=sample_steps),
                    # resumes a run of the same options; other options replace the old run (start_training)
                    resume=True, overwrite=True, progress=False, lock=False,  # the lock is held above
                )
                job.manifest = extract(self.image_path, self.run, run_config, pipe=pipe, callbacks=[callback])
            job.status = f"done: {job.manifest['num_concepts']} tokens learned in {len(job.records)} steps"
        except TrainingCancelled:
            job.cancelled = True
            step = job.records[-1]["step"] if job.records else 0
            job.status = f"cancelled at step {step}/{job.steps}; Train again resumes from there"
        except ConceptExpressError as exc:
            job.error = job.status = f"error: {exc}"
        except Exception as exc:  # a bug: one line in the page, the traceback in the server log
            logger.exception("training failed")
            job.error = job.status = f"error: internal error ({type(exc).__name__}: {str(exc)[:200]})"
        finally:
            job.done.set()

    # ------------------------------------------------------------------ 5. generate and download
    def samples(self) -> list[tuple[str, str]]:
        """(image path, caption) of the samples written after training: each concept alone, then all together."""
        manifest = self._trained()
        return [(str(self.run / f), prompt) for prompt, files in manifest.get("samples", {}).items() for f in files]

    def tokens(self) -> list[str]:
        return [t["token"] for t in self._trained()["tokens"]]

    def _trained(self) -> dict[str, Any]:
        if self.image_path is None or not (self.run / RunFolder.MANIFEST).is_file():
            raise InputError("no trained tokens yet: train first")
        return read_manifest(self.run)

    def generate(self, prompt: str, n: int = 1, steps: int = 20, seed: int = 0,
                 on_wait: Callable[[str], None] | None = None) -> list[str]:
        """Images for ``prompt`` (``<c1>``…, ``all``); written under RUN/generated like `conceptexpress generate`."""
        self._require("generate")
        tokens = self.tokens()
        expanded = expand_prompt(prompt, tokens)
        config = GenerateConfig(n=int(n), steps=int(steps), seed=int(seed))
        with self.studio.using_model("generating", on_wait) as pipe, RunFolder(self.run).lock():
            root = generate_from_run(self.run, [expanded], config, pipe=pipe)  # hands the pipeline back as found
        folder = prompt_folders(root, [expanded])[0]
        return [str(p) for p in sorted(folder.glob("[0-9]*.png"))]

    def zip(self) -> Path:
        """A zip of the run (tokens in diffusers and A1111 format, manifest, masks, pictures) under WORKDIR."""
        self._trained()
        out = (self.studio.config.workdir / "downloads" / self.id).resolve()
        out.mkdir(parents=True, exist_ok=True)
        path = out / "conceptexpress-run.zip"
        tmp = path.with_suffix(".zip.part")
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for name in ZIP_CONTENT:
                p = self.run / name
                files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p] if p.is_file() else []
                for f in files:
                    z.write(f, f.relative_to(self.run).as_posix())
        tmp.replace(path)
        return path
