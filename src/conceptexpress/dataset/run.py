"""One process's shard through :func:`~conceptexpress.extract.extract`: skip, resume, record, summarize."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import logging
import os
import time
from dataclasses import MISSING, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ..config import LocalizeConfig, ModelConfig, RunConfig, TrainConfig, config_dict
from ..errors import ConfigError, OutputError
from ..extract import extract
from ..io.atomic import atomic_write_json, ensure_output_dir
from ..io.checked import file_sha256
from ..io.images import load_image
from ..io.run_folder import RunFolder
from ..learn.methods import get_method
from ..models import load_pipeline
from .shards import (
    _check_rank,
    _launcher_vars,
    check_unique_stems,
    list_images,
    local_rank_from_env,
    process_model_config,
    shard,
    shard_from_env,
)
from .summary import DatasetSummary, failures_path, summary_path

logger = logging.getLogger(__package__)  # "conceptexpress.dataset": the command line filters its summary line


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent, or not ours; atomic writes mean a half-written file cannot occur
    return data if isinstance(data, dict) else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]


class _TextSide:
    """Snapshot of the pipeline's tokenizer and input embeddings, restored after each photo.

    ``extract`` loads ``<c1>…<cN>`` into the tokenizer and text encoder to draw its samples and leaves them
    there. On a pipeline shared across photos the next photo's samples would then find ``<c1>`` already in the
    vocabulary and be drawn with the *previous* photo's tokens. Restoring the original state after each photo
    keeps every photo independent of the ones before it. transformers resizes the embedding *in place*
    (same module, new ``weight.data``, new ``num_embeddings``), so the snapshot holds the original weight
    tensor as well as the module.
    """

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.tokenizer = copy.deepcopy(pipe.tokenizer)
        self.size = len(pipe.tokenizer)
        self.module = pipe.text_encoder.get_input_embeddings()
        self.weight = self.module.weight.data  # the original rows, kept alive by this reference
        self.padding_idx = getattr(self.module, "padding_idx", None)
        self.vocab_size = getattr(pipe.text_encoder.config, "vocab_size", None)

    def restore(self) -> None:
        pipe = self.pipe
        if len(pipe.tokenizer) != self.size:
            pipe.tokenizer = copy.deepcopy(self.tokenizer)  # a copy: the next photo may add tokens again
        if pipe.text_encoder.get_input_embeddings() is not self.module:
            pipe.text_encoder.set_input_embeddings(self.module)
        weight = self.module.weight
        if weight.shape != self.weight.shape or weight.data_ptr() != self.weight.data_ptr():
            self.module.weight.data = self.weight
            self.module.weight.grad = None  # a gradient of the resized table no longer fits
            self.module.num_embeddings = self.weight.shape[0]
            self.module.padding_idx = self.padding_idx
        if self.vocab_size is not None:
            pipe.text_encoder.config.vocab_size = self.vocab_size


def _mismatch(run: Path, image: Path, recorded: str, sha: str, what: str) -> OutputError:
    return OutputError(
        f"run folder '{run}' holds a {what} run of another image (sha256 {recorded[:12]}…, '{image.name}' is "
        f"{sha[:12]}…); move the folder away or choose another --out"
    )


def _with_defaults(name: str, recorded: dict[str, Any]) -> dict[str, Any]:
    cls = {"LocalizeConfig": LocalizeConfig, "TrainConfig": TrainConfig}[name]
    return {**{f.name: f.default for f in fields(cls) if f.default is not MISSING}, **recorded}


def _config_differences(manifest: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the options a finished run was made with that differ from the ones asked for now."""
    recorded = manifest.get("config", {})
    # Training options a method forces whatever was asked (BaS† has no split-and-merge and no contrastive loss);
    # a manifest records the config actually used, so these are compared as forced.
    forced = get_method(wanted["method"]).forced_train
    wanted = {**wanted, "TrainConfig": {**wanted["TrainConfig"], **forced}}
    # A field added since the run was made counts as its default (the behaviour before the field existed).
    diffs = [k for k in ("LocalizeConfig", "TrainConfig") if k in recorded and _with_defaults(k, recorded[k]) != wanted[k]]
    if recorded.get("ModelConfig", {}).get("model") not in (None, wanted["ModelConfig"]["model"]):
        diffs.append("model")
    if manifest.get("method", "conceptexpress") != wanted["method"]:
        diffs.append("method")
    return diffs


def extract_dataset(
    folder: str | Path,
    runs_dir: str | Path,
    config: RunConfig | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    pipe=None,
) -> DatasetSummary:
    """Run :func:`~conceptexpress.extract.extract` on this process's shard of the photos in ``folder``.

    ``config`` (:class:`~conceptexpress.config.RunConfig`) is every photo's: its method must run without per-photo
    supervision (:meth:`~conceptexpress.learn.methods.Method.check_dataset`: no ``masks``, no ``init_words``);
    ``resume`` is decided per photo. Each photo gets the run folder ``runs_dir/<stem>``. ``rank``/``world_size``
    default to the launcher's environment (:func:`shard_from_env`), else a single process. The pipeline is loaded
    once per process (``load_pipeline(config.model)``, on ``cuda:LOCAL_RANK`` under a multi-GPU launch, see
    :func:`process_model_config`), and only when some photo of the shard still needs work; pass ``pipe`` to
    use one already loaded (kept where it is).

    Per photo: a finished run of the same image bytes is skipped; a half-finished one is continued
    (``resume=True``); a run folder holding another image's run is a failure; with ``config.overwrite`` a run of
    another image or of other options (finished or not) is replaced instead (``extract`` with ``overwrite``); any
    error of the photo is recorded in ``runs_dir/failures-rank<r>.json`` (rewritten after each failure) and the next photo starts.
    Errors that concern every photo (no photo, colliding stems, bad option, model that does not load,
    unwritable ``runs_dir``) are raised before or instead of per-photo work. ``KeyboardInterrupt`` writes the
    summary (``interrupted``) and propagates.

    Returns:
        The :class:`DatasetSummary`, also written atomically to ``runs_dir/summary-rank<r>.json``.
    """
    config = config or RunConfig()
    if config.model is None:
        config = dataclasses.replace(config, model=ModelConfig())

    # 1. Everything that concerns the whole dataset fails here, before any photo is touched.
    if config.masks is not None:
        raise ConfigError(
            f"a dataset run has no per-photo masks: run `extract IMAGE --masks DIR` for each photo (got masks "
            f"{str(config.masks)!r})"
        )
    get_method(config.method).check_dataset(config.train)
    rank, world_size = _resolve_shard(rank, world_size)
    images = list_images(folder)
    check_unique_stems(images)  # over all photos, not the shard: every process reaches the same verdict
    mine = shard(images, rank, world_size)
    runs = ensure_output_dir(runs_dir)
    who = f"rank {rank}/{world_size}: " if world_size > 1 else ""
    logger.info("%s%d of %d images in '%s' -> '%s'", who, len(mine), len(images), folder, runs)

    tally = _Tally(str(folder), runs, rank, world_size, config.method, len(mine))
    worker = _ShardWorker(config, world_size, pipe, tally)
    tally.write_failures()  # once at the start: a rerun that fixes a photo does not keep its old failure
    bar = _bar(len(mine), rank, world_size, config.progress)
    # Log lines go through tqdm.write while the bar is shown, so they do not tear it apart.
    logs = _redirect_logs(bar)
    try:
        for image in mine:
            try:
                worker.photo(image, runs / image.stem)
            finally:
                _bar_update(bar, tally.done, tally.skipped, tally.failed)
    except KeyboardInterrupt:
        # Not swallowed: the dataset stops. The summary says how far it got; finished runs stay, and the
        # same command skips them next time.
        _close(bar, logs)
        stopped = tally.summary(interrupted=True)
        atomic_write_json(summary_path(runs, rank), stopped.to_json())
        logger.warning("%s", stopped.line())
        raise
    _close(bar, logs)
    result = tally.summary(interrupted=False)
    atomic_write_json(summary_path(runs, rank), result.to_json())
    # Tagged so the command line, which prints this line itself, can leave it out of its log.
    logger.log(logging.WARNING if tally.failed else logging.INFO, "%s", result.line(), extra={"dataset_summary": True})
    return result


def _resolve_shard(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size) as given, else from the launcher's environment, else (0, 1); checked."""
    if (rank is None) != (world_size is None):
        raise ConfigError(
            f"give both `rank` and `world_size` or neither, got rank={rank!r}, world_size={world_size!r}"
        )
    if rank is None:
        rank, world_size = shard_from_env()
        names = _launcher_vars(os.environ)
        if names:
            logger.info("shard from the launcher: %s=%d, %s=%d", names[0], rank, names[1], world_size)
    assert world_size is not None
    _check_rank(rank, world_size, "rank", "world_size")
    return rank, world_size


class _Tally:
    """What one shard has done so far: photos by outcome, their failures and UNet sample-passes."""

    def __init__(self, folder: str, runs: Path, rank: int, world_size: int, method: str, images: int) -> None:
        self.folder, self.runs, self.rank, self.world_size, self.method, self.images = (
            folder, runs, rank, world_size, method, images
        )
        self.fail_file = failures_path(runs, rank)
        self.started_at = time.perf_counter()
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.done: list[str] = []
        self.skipped: list[str] = []
        self.failed: list[str] = []
        self.resumed: list[str] = []
        self.failures: list[dict[str, str]] = []
        self.passes = {"done": 0, "skipped": 0}

    def write_failures(self) -> None:
        # Rewritten in full after each failure, so a crash loses none.
        atomic_write_json(self.fail_file, {"rank": self.rank, "world_size": self.world_size, "failures": self.failures})

    def fail(self, image: Path, run: Path, exc: BaseException) -> None:
        _record(self.failures, self.failed, image, run, exc)
        self.write_failures()

    def summary(self, interrupted: bool) -> DatasetSummary:
        return DatasetSummary(
            folder=self.folder, runs_dir=str(self.runs), rank=self.rank, world_size=self.world_size,
            method=self.method, images=self.images, done=tuple(self.done), skipped=tuple(self.skipped),
            failed=tuple(self.failed), resumed=tuple(self.resumed), sample_passes=self.passes["done"],
            sample_passes_total=self.passes["done"] + self.passes["skipped"],
            wall_s=round(time.perf_counter() - self.started_at, 3), failures_file=str(self.fail_file),
            interrupted=interrupted, started=self.started,
            finished=datetime.now(UTC).isoformat(timespec="seconds"),
        )


class _ShardWorker:
    """Runs the photos of a shard one by one with one pipeline, loaded when the first photo needs it."""

    def __init__(self, config: RunConfig, world_size: int, pipe, tally: _Tally) -> None:
        self.config, self.world_size, self.pipe, self.tally = config, world_size, pipe, tally
        self.overwrite = config.overwrite
        self.wanted = {**config_dict(config.model, config.localize, config.train), "method": config.method}
        self.text_side: _TextSide | None = None

    def photo(self, image: Path, run: Path) -> None:
        """Skip, resume or run one photo; its failure is recorded and does not stop the shard."""
        tally = self.tally
        # 2. Finished, half-finished, or another image's? Decided from the files each stage writes last.
        try:
            try:
                status, manifest = _run_status(run, image, file_sha256(image))
            except OutputError:
                if not self.overwrite:
                    raise
                status, manifest = "replace", {}  # another image's run: extract removes it
            if status == "finished" and self.overwrite and _config_differences(manifest, self.wanted):
                status = "replace"
            if status != "finished":
                # Decoding is cheap next to training: a broken photo fails here, and a rerun that finds only
                # broken photos left never loads the model.
                load_image(image)
        except Exception as exc:  # a bad photo or a foreign run folder: this photo only
            tally.fail(image, run, exc)
            return
        if status == "finished":
            diffs = _config_differences(manifest, self.wanted)
            if diffs:
                logger.warning("%s: skipped, finished with other options (%s); delete '%s' or pass --overwrite "
                               "to redo it", image.name, ", ".join(diffs), run)
            tally.skipped.append(image.name)
            tally.passes["skipped"] += int(manifest.get("sample_passes") or 0)
            return

        # 3. The model, once per process and only when a photo needs it. A model that does not load concerns
        # every photo: raised, not recorded.
        if self.pipe is None:
            model = process_model_config(self.config.model, self.world_size, local_rank_from_env())
            self.config = dataclasses.replace(self.config, model=model)
            self.pipe = load_pipeline(model)
        if self.text_side is None:
            self.text_side = _TextSide(self.pipe)

        # 4. The photo. Any failure is recorded and the next photo starts; Ctrl-C is no Exception.
        try:
            config = dataclasses.replace(
                self.config, resume=status == "partial",
                progress=self.config.progress and self.world_size == 1,  # one process: its training bar nests below
            )
            out = extract(image, run, config, pipe=self.pipe)
        except Exception as exc:
            logger.debug("%s failed", image, exc_info=True)
            tally.fail(image, run, exc)
            _free_accelerator_memory()
        else:
            tally.done.append(image.name)
            if status == "partial":
                tally.resumed.append(image.name)
            tally.passes["done"] += int(out.get("sample_passes") or 0)
            logger.info("%s: %d concepts -> %s", image.name, out.get("num_concepts", 0), run)
        finally:
            self.text_side.restore()


def _run_status(run: Path, image: Path, sha: str) -> tuple[str, dict[str, Any]]:
    """``("finished", manifest)``, ``("partial", {})`` or ``("new", {})`` for the run folder of ``image``.

    Raises:
        OutputError: the folder holds a run (finished or not) of different image bytes, e.g. a photo of the
            same name from another folder written to the same ``--out``.
    """
    manifest = _read_json(run / RunFolder.MANIFEST)
    if manifest is not None and manifest.get("complete") is True:
        if manifest.get("image_sha256") != sha:
            raise _mismatch(run, image, str(manifest.get("image_sha256")), sha, "finished")
        return "finished", manifest
    loc = _read_json(run / RunFolder.LOCALIZATION)
    if loc is not None and loc.get("image_sha256") not in (None, sha):
        raise _mismatch(run, image, str(loc["image_sha256"]), sha, "half-finished")
    return ("partial" if loc is not None or (run / RunFolder.CHECKPOINTS_DIR).is_dir() else "new"), {}


def _record(failures: list[dict[str, str]], failed: list[str], image: Path, run: Path, exc: BaseException) -> None:
    failures.append({"image": str(image), "run": str(run), "error": type(exc).__name__, "message": _one_line(exc)})
    failed.append(image.name)
    logger.warning("%s: failed: %s: %s", image.name, type(exc).__name__, _one_line(exc))


def _free_accelerator_memory() -> None:
    # A failure mid-training (CUDA out of memory, say) leaves its activations to the caching allocator; hand
    # them back so the next photo starts from the same free memory as the first.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bar(total: int, rank: int, world_size: int, progress: bool):
    if not progress:
        return None
    # One line per process: `position` keeps the bars of a multi-process launch on separate terminal rows.
    return tqdm(total=total, desc=f"rank {rank} images" if world_size > 1 else "images", unit="image",
                position=rank if world_size > 1 else None, dynamic_ncols=True)


def _redirect_logs(bar) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if bar is not None:
        stack.enter_context(logging_redirect_tqdm())
    return stack


def _close(bar, logs: contextlib.ExitStack) -> None:
    logs.close()
    if bar is not None:
        bar.close()


def _bar_update(bar, done: list[str], skipped: list[str], failed: list[str]) -> None:
    if bar is None:
        return
    bar.update(len(done) + len(skipped) + len(failed) - bar.n)
    bar.set_postfix(done=len(done), skipped=len(skipped), failed=len(failed))
