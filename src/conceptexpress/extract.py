"""Localization + token learning + export for one photo (``conceptexpress extract``; layout in README "Outputs").

The run folder grows in stages, each finished stage marked by a file written last:

    localization.json   localization done (reused by later runs with the same image, model and config)
    checkpoints/        resumable training state (``--resume``)
    pipeline/           ``method="bas-ft"`` only: the fine-tuned pipeline, written before the manifest
    manifest.json       tokens exported; ``"complete": true`` only once everything is written

so an interrupted run never leaves a folder that looks complete, and ``--resume`` loses nothing finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .attention.localizer import ConceptLocalizer
from .baselines.bas_ft import BaSFineTuner, training_copy
from .config import (
    METHODS,
    GenerateConfig,
    LocalizeConfig,
    ModelConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    config_dict,
)
from .embeddings import run_tokens
from .errors import ConfigError, InputError, NoConceptError, OutputError, RunFolderError
from .export import write_token_files
from .generate import generate, sampler_record
from .io.atomic import atomic_save_image, atomic_write_bytes, atomic_write_json, ensure_output_dir
from .io.images import load_image
from .io.localization_files import read_localization, save_localization
from .io.lock import run_lock
from .io.masks import MaskFolder, read_mask_folder
from .io.run_folder import (
    CHECKPOINTS_DIR,
    LOCALIZATION_MANIFEST,
    PIPELINE_DIR,
    RUN_FORMAT,
    RUN_MANIFEST,
    RUN_OPTIONS,
    SAMPLES_DIR,
    SOURCE_STEM,
    TRAINED_OUTPUTS,
    RunManifest,
    file_sha256,
    read_json_checked,
    source_copy_name,
    token_names,
    versions,
)
from .io.run_options import (
    clear_outputs,
    option_differences,
    read_run_options,
    run_options,
    write_run_options,
)
from .learn.methods import get_method
from .learn.trainer import TokenTrainer, loss_curve_image, released_sample_passes
from .models import load_pipeline
from .models.family import family_of

__all__ = ["METHODS", "RunConfig", "SampleConfig", "extract", "localize_run", "localize_to_folder"]

logger = logging.getLogger(__name__)


def _localization_matches(
    out: Path, image_sha: str, model: str, loc_cfg: LocalizeConfig, masks_sha: str | None = None
) -> bool:
    path = out / LOCALIZATION_MANIFEST
    if not path.is_file():
        return False
    try:
        meta = read_json_checked(path)
    except RunFolderError as exc:
        logger.warning("%s; recomputing the localization", exc)
        return False
    config = meta.get("config")
    return (
        meta.get("image_sha256") == image_sha
        and meta.get("model") == model
        and isinstance(config, dict)
        and config.get("LocalizeConfig") == config_dict(loc_cfg)["LocalizeConfig"]
        and meta.get("masks_sha256") == masks_sha  # user masks: the same files; automatic: none
    )


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
    """``conceptexpress localize``: localize one photo into ``out_dir`` (locked, as :func:`extract` locks it).

    A folder that holds a trained run keeps it consistent: a new localization under its tokens would make a mix,
    so it is refused (:class:`~conceptexpress.errors.OutputError`) unless ``overwrite=True``, which clears the
    run's trained outputs first. Returns ``(manifest, Localization)`` like :func:`localize_to_folder`.
    """
    model = model or ModelConfig()
    localize = localize or LocalizeConfig()
    image = load_image(image_path)
    image_sha = file_sha256(image_path)
    out = ensure_output_dir(out_dir)
    with run_lock(out, wait=wait):
        trained = _trained_outputs(out)
        if trained and not overwrite:
            raise OutputError(
                f"run folder '{out}' holds a trained run ({', '.join(trained)}); a new localization would not match "
                "its tokens: pass --overwrite (overwrite=True) to replace the run, or choose another --out"
            )
        clear_outputs(out, TRAINED_OUTPUTS)
        if pipe is None:
            pipe = load_pipeline(model)
        return localize_to_folder(pipe, image, image_path, out, model, localize, image_sha=image_sha)


def extract(
    image_path: str | Path,
    out_dir: str | Path,
    config: RunConfig | None = None,
    *,
    pipe=None,
    callbacks: Sequence[Callable[[Any, dict[str, Any]], None]] = (),
) -> RunManifest:
    """Run the whole method on one photo and return the written run manifest (see module docstring).

    ``config`` (:class:`~conceptexpress.config.RunConfig`, default the paper's method) holds the method's configs,
    the inputs beside the photo and how the run folder is treated. ``config.method`` is a name of
    :data:`~conceptexpress.learn.methods.METHOD_REGISTRY`: ``"conceptexpress"``; ``"bas-dagger"`` (BaS†, paper
    §4.1); ``"bas"`` — Break-A-Scene's token phase with the user's ``masks`` and ``train.init_words`` (paper Table 1
    grey row "BaS", Fig. 8); ``"bas-ft"`` — then its UNet + text encoder phase (``config.finetune``), which writes
    the fine-tuned pipeline to ``RUN/pipeline/``, the run's base model for ``generate`` and ``evaluate``.

    ``config.masks``: a folder with one mask image per concept (:func:`~conceptexpress.io.masks.read_mask_folder`);
    the concepts are those masks, in file-name order, and localization's clustering is skipped. What each method
    accepts and needs is :meth:`~conceptexpress.learn.methods.Method.check`.

    ``callbacks`` are called after every training step as ``callback(trainer, record)`` (progress, cancel).

    The run folder is locked for the whole call (:func:`~conceptexpress.io.lock.run_lock`): a second process on
    the same folder gets :class:`~conceptexpress.io.lock.RunLockedError` at once, or waits with ``config.wait``.
    ``config.lock=False`` is for a caller that already holds the folder's lock (the web UI).

    ``config.runtime`` (micro-batch, precision, checkpoints) defaults to ``train.runtime``; it is not part of the
    method, so ``resume=True`` accepts a different one.

    A folder holds one run (:mod:`~conceptexpress.io.run_options`). When it holds a run made with other options
    (image, model, method, user masks, ``LocalizeConfig``, ``TrainConfig``, ``FineTuneConfig`` for ``"bas-ft"``),
    the call refuses with :class:`~conceptexpress.errors.OutputError`, unless ``config.overwrite``: then the old
    run's outputs are removed first and a new run starts (also with ``resume``, which then only resumes a run of
    the same options). Without ``resume``, a rerun with the same options is a new run too: the old run's trained
    outputs are removed before training; a matching localization is reused.
    """
    config = _with_model(config or RunConfig(), pipe)
    method = get_method(config.method)

    # 1. Cheap checks first (method, image, masks, output folder), then the model.
    image = load_image(image_path)
    user_masks = read_mask_folder(config.masks, image.size) if config.masks is not None else None
    method.check(config.train, masks=user_masks.num_concepts if user_masks else None,
                 source=f"`masks` {str(user_masks.folder)!r}" if user_masks else "`masks`")
    photo = _Photo(image, Path(image_path), file_sha256(image_path), user_masks)
    out = ensure_output_dir(out_dir)
    with run_lock(out, wait=config.wait) if config.lock else contextlib.nullcontext():
        resume = _start_run(out, photo, config)
        _keep_edits(out, photo, config)
        (out / RUN_MANIFEST).unlink(missing_ok=True)  # until the new manifest lands, the run is not complete
        if not method.fine_tunes:
            shutil.rmtree(out / PIPELINE_DIR, ignore_errors=True)  # a previous bas-ft run's model, no longer referenced
        if pipe is None:
            pipe = load_pipeline(config.model)

        # 2. Localization, once per image (reused when image, model, config and user masks match).
        loc_manifest, tensors = _localization(pipe, photo, out, config)
        if int(loc_manifest["num_concepts"]) == 0:
            raise NoConceptError(f"no salient concept found in {str(image_path)!r}; see {out / 'stages.png'}")
        # 3. Token learning (resumable), then Break-A-Scene's phase 2 for a method that fine-tunes.
        learned = _learn(pipe, photo, out, config, loc_manifest, tensors, resume=resume, callbacks=callbacks)
        # 4. Export: one diffusers file and one A1111/ComfyUI file per concept, loss curve, the photo's copy.
        entries = _export(out, photo, loc_manifest, learned)
        # 5. Samples of each concept alone and all together, from the pipeline in memory.
        samples = (
            _write_samples(learned.sample_pipe, out, token_names(len(entries)), learned.result.embeddings,
                           config.sample, config.train.seed)
            if config.sample.samples else ({}, None)
        )
        # 6. The manifest, last: the run is complete once it lands.
        return _write_manifest(out, photo, config, entries, learned, samples)


@dataclasses.dataclass(frozen=True)
class _Photo:
    """The checked inputs of one run: the decoded photo, its path and SHA-256, the user's masks (or None)."""

    image: Any  # PIL.Image.Image, RGB
    path: Path
    sha256: str
    user_masks: MaskFolder | None

    @property
    def masks_sha256(self) -> str | None:
        return self.user_masks.sha256 if self.user_masks is not None else None


@dataclasses.dataclass(frozen=True)
class _Learned:
    """What token learning gave: the TrainResult, the config the trainer used, the pipeline to sample from (the
    fine-tuned one for bas-ft) and the fine-tune's manifest entries (None without one)."""

    result: Any
    train: TrainConfig
    sample_pipe: Any
    fine_tune: dict[str, Any] | None


def _with_model(config: RunConfig, pipe) -> RunConfig:
    if config.model is not None:
        return config
    # A caller's pipeline without a ModelConfig: record the model it was loaded from, not the default id.
    origin = getattr(pipe, "name_or_path", None) if pipe is not None else None
    model = ModelConfig(model=origin) if isinstance(origin, str) and origin.strip() else ModelConfig()
    return dataclasses.replace(config, model=model)


def _keep_edits(out: Path, photo: _Photo, config: RunConfig) -> None:
    """An edited localization (``conceptexpress edit``) is the user's work: options that would recompute it (another
    image, model, LocalizeConfig or masks) are refused unless ``overwrite``, before the model loads."""
    path = out / LOCALIZATION_MANIFEST
    if not path.is_file():
        return
    try:
        edits = read_json_checked(path).get("edits")
    except RunFolderError:
        return  # damaged: recomputed with a warning (_localization)
    if not edits or _localization_matches(out, photo.sha256, config.model.model, config.localize, photo.masks_sha256):
        return
    if not config.overwrite:
        raise OutputError(
            f"'{out}' holds an edited localization ({len(edits)} edits) made with other options; these options would "
            "recompute it and lose the edits: rerun with the options it was made with (its localization.json), or "
            "pass --overwrite to recompute it"
        )
    logger.warning("recomputing the edited localization in %s with other options (--overwrite): its edits are dropped", out)


def _start_run(out: Path, photo: _Photo, config: RunConfig) -> bool:
    """Make ``out`` hold this run only (a resume of it, or a new one); returns whether to resume."""
    fine_tunes = get_method(config.method).fine_tunes
    configs = config_dict(config.localize, config.train, *([config.finetune] if fine_tunes else []))
    model = config.model
    options = run_options(image_sha256=photo.sha256, model=_model_record(model),
                          single_file_config=model.single_file_config, method=config.method, configs=configs,
                          masks_sha256=photo.masks_sha256)
    resume, overwrite = config.resume, config.overwrite
    # A run.json beside nothing trained (the model did not load, say) is no run yet: nothing could be mixed.
    trained = bool(_trained_outputs(out))
    try:
        old = read_run_options(out) if trained else None
    except RunFolderError as exc:
        if not overwrite:
            raise RunFolderError(f"{exc}; pass --overwrite (overwrite=True) to replace the run in '{out}'") from None
        logger.warning("%s; replacing the run (--overwrite)", exc)
        old = {}
    diffs = option_differences(old, options) if old else []
    if old is not None and (diffs or old == {}):
        if not overwrite:
            raise OutputError(
                f"run folder '{out}' holds a run made with other options ({'; '.join(diffs)}); pass --overwrite "
                "(overwrite=True) to replace it, or choose another --out"
            )
        logger.warning("replacing the run in %s, made with other options (%s)", out, "; ".join(diffs) or "unknown")
        resume = False
    # A new run: nothing trained by the previous one stays. A resume redraws the samples (their number may differ).
    clear_outputs(out, TRAINED_OUTPUTS if not resume else (SAMPLES_DIR,))
    write_run_options(out, options)
    return resume


def _copy_source(photo: _Photo, out: Path) -> str:
    """Copy the photo's bytes to ``RUN/source.<ext>`` (a run folder is self-contained: evaluation never reads a
    path outside it); returns the name. Raises InputError if the photo changed since the run started."""
    data = photo.path.read_bytes()
    if hashlib.sha256(data).hexdigest() != photo.sha256:
        raise InputError(f"the photo {str(photo.path)!r} changed while the run was working on it; run again")
    name = source_copy_name(photo.path)
    for stale in out.glob(f"{SOURCE_STEM}.*"):
        if stale.name != name:
            stale.unlink()
    atomic_write_bytes(out / name, data)
    return name


def _trained_outputs(out: Path) -> list[str]:
    """What a run trained that is present in ``out`` (``run.json`` alone is no run yet: nothing could be mixed)."""
    return [name for name in TRAINED_OUTPUTS if name != RUN_OPTIONS and (out / name).exists()]


def _model_record(model: ModelConfig) -> str:
    # A local model is recorded by absolute path so `generate` finds it from any working directory.
    return str(Path(model.model).resolve()) if Path(model.model).exists() else model.model


def _learn(pipe, photo: _Photo, out: Path, config: RunConfig, loc_manifest, tensors, *, resume: bool,
           callbacks) -> _Learned:
    """Token learning with the method's trainer (resumable from ``RUN/checkpoints``), then, for a method that
    fine-tunes (bas-ft), Break-A-Scene's phase 2 on fp32 copies of the UNet and text encoder, saved as
    ``RUN/pipeline/``."""
    method = get_method(config.method)
    runtime = config.runtime_or_default
    trainer = method.trainer_class()(
        pipe, photo.image, tuple(loc_manifest["work_size"]), tensors["masks"].bool(), tensors["centroids"],
        config.train, runtime=runtime,
    )
    result = _train(trainer, out / CHECKPOINTS_DIR, resume, config.progress, callbacks)
    if not method.fine_tunes:
        return _Learned(result, trainer.config, pipe, None)
    ft_pipe, result, fine_tune = _finetune(
        pipe, photo.image, (loc_manifest, tensors), trainer.config, runtime, config, result, out, callbacks
    )
    model = config.model
    fine_tune = {"base_model": _model_record(model), "single_file_config": model.single_file_config, **fine_tune}
    return _Learned(result, trainer.config, ft_pipe, fine_tune)


def _export(out: Path, photo: _Photo, loc_manifest: dict[str, Any], learned: _Learned) -> list[dict[str, Any]]:
    """The token files (diffusers and A1111/ComfyUI), history, loss curve and the photo's copy; returns the
    manifest's token entries (with each concept's mask file)."""
    result, family = learned.result, family_of(learned.sample_pipe)
    entries = write_token_files(out, token_names(int(loc_manifest["num_concepts"])), result.embeddings,
                                keys=family.export_keys, dims=family.embedding_dims(learned.sample_pipe))
    for entry, mask in zip(entries, loc_manifest["masks"]):
        entry["mask"] = mask
    atomic_write_json(out / "history.json", result.history)
    atomic_save_image(loss_curve_image(result.history), out / "loss.png")
    _copy_source(photo, out)
    return entries


def _write_manifest(out: Path, photo: _Photo, config: RunConfig, entries: list[dict[str, Any]], learned: _Learned,
                    samples: tuple[dict[str, list[str]], dict[str, Any] | None]) -> RunManifest:
    """The run's manifest (``"complete": true``), written last."""
    model, result, fine_tune, user_masks = config.model, learned.result, learned.fine_tune, photo.user_masks
    n = len(entries)
    sample_files, sampler = samples
    manifest = {
        "format": RUN_FORMAT,
        "method": config.method,
        "image": str(photo.path.resolve()),
        "image_sha256": photo.sha256,
        "source_image": source_copy_name(photo.path),  # the photo's bytes inside the run: what evaluate reads
        # A local model is recorded by absolute path so `generate` finds it from any working directory; a bas-ft
        # run's is its own RUN/pipeline/, relative to the run folder (``generate.run_model_config`` resolves it).
        "base_model": PIPELINE_DIR if fine_tune is not None else _model_record(model),
        "single_file_config": None if fine_tune is not None else model.single_file_config,
        "fine_tune": fine_tune,  # bas-ft: the model it started from, the phase's settings and cost
        "family": family_of(learned.sample_pipe).name,  # sd1, sd2 or sdxl (conceptexpress.models.family)
        # --masks: the user's mask files (None: the localization's masks); init words are in TrainConfig.
        "user_masks": None if user_masks is None else {
            "folder": str(user_masks.folder.resolve()), "files": list(user_masks.files), "sha256": user_masks.sha256,
        },
        "tokens": entries,
        "num_concepts": n,
        "num_vectors": 1,
        "embedding_dim": int(result.embeddings.shape[1]),
        "seed": config.train.seed,
        "steps": result.steps,
        "sample_passes": result.sample_passes,
        "optimizer_steps": result.optimizer_steps,
        "skipped_steps": result.skipped_steps,  # fp16 steps dropped by loss scaling (overflow); 0 in bf16/fp32
        "released_code_sample_passes": (
            released_sample_passes(n, config.train) if get_method(config.method).merge_schedule else None
        ),
        "final_loss": result.history[-1]["loss"] if result.history else None,
        "localization": LOCALIZATION_MANIFEST,
        "overlay": "overlay.png",
        "loss_curve": "loss.png",
        "history": "history.json",
        "samples": sample_files,
        "sampler": sampler,  # scheduler, its config, steps, guidance, size of the samples (None: no samples)
        # The config actually used (FineTuneConfig only where it was).
        "config": config_dict(model, config.localize, learned.train, config.runtime_or_default, config.sample,
                              *([config.finetune] if fine_tune else [])),
        "versions": versions(),
        "complete": True,
    }
    run_manifest = RunManifest.from_dict(manifest, source=str(out / RUN_MANIFEST))
    run_manifest.write(out)
    return run_manifest


def _localization(pipe, photo: _Photo, out: Path, config: RunConfig):
    """(localization manifest, tensors) of ``out``: read back when image, model, config and user masks match, else
    computed (from the user's masks when given).

    A damaged localization (a file truncated, garbled, of another SHA-256 or shape) is derived state: it is
    recomputed, with a warning naming the file.
    """
    if _localization_matches(out, photo.sha256, config.model.model, config.localize, photo.masks_sha256):
        try:
            found = read_localization(out)
        except RunFolderError as exc:
            logger.warning("%s; recomputing the localization", exc)
        else:
            logger.info("reusing the localization in %s", out)
            return found
    localize_to_folder(pipe, photo.image, photo.path, out, config.model, config.localize, image_sha=photo.sha256,
                       user_masks=photo.user_masks)
    return read_localization(out)


def _finetune(pipe, image, localization, train: TrainConfig, runtime, config: RunConfig, result, out: Path,
              callbacks):
    """Break-A-Scene's phase 2 (:mod:`conceptexpress.baselines.bas_ft`) after the token phase's ``result``.

    ``localization`` is the (manifest, tensors) pair of the run's localization. Returns (fine-tuned pipeline,
    combined TrainResult, manifest entries). The pipeline is written to ``RUN/pipeline/`` (safetensors) through a
    staging folder, so a crash never leaves a half-written model there.
    """
    loc_manifest, tensors = localization
    finetune = config.finetune
    ft_pipe = training_copy(pipe, text_encoder=finetune.finetune_text_encoder)
    tuner = BaSFineTuner(
        ft_pipe, image, tuple(loc_manifest["work_size"]), tensors["masks"].bool(), tensors["centroids"], train,
        vectors=result.embeddings, finetune=finetune, runtime=runtime,
    )
    phase2 = _train(tuner, None, False, config.progress, callbacks)
    staging = out / f".{PIPELINE_DIR}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    ft_pipe.save_pretrained(staging, safe_serialization=True)
    shutil.rmtree(out / PIPELINE_DIR, ignore_errors=True)
    staging.rename(out / PIPELINE_DIR)
    history = [*result.history, *({**r, "step": result.steps + r["step"]} for r in phase2.history)]
    combined = dataclasses.replace(
        phase2,
        history=history,
        sample_passes=result.sample_passes + phase2.sample_passes,
        optimizer_steps=result.optimizer_steps + phase2.optimizer_steps,
        steps=result.steps,
        skipped_steps=result.skipped_steps + phase2.skipped_steps,
    )
    entries = {
        "pipeline": PIPELINE_DIR,
        "steps": phase2.steps,
        "lr": finetune.finetune_lr,
        "text_encoder": finetune.finetune_text_encoder,
        "sample_passes": phase2.sample_passes,
        "final_loss": phase2.history[-1]["loss"] if phase2.history else None,
    }
    return ft_pipe, combined, entries


def _train(trainer: TokenTrainer, checkpoint_dir: Path, resume: bool, progress: bool, callbacks=()):
    """Run ``trainer`` with a progress bar (when asked), the caller's ``callbacks`` and resumable checkpoints;
    returns its TrainResult."""
    bars = [_ProgressBar(trainer.config.steps, trainer.step)] if progress else []
    try:
        return trainer.train(checkpoint_dir=checkpoint_dir, resume=resume, callbacks=[*bars, *callbacks])
    finally:
        for bar in bars:
            bar.close()


def _write_samples(
    pipe, out: Path, tokens, embeddings: torch.Tensor, cfg: SampleConfig, seed: int
) -> tuple[dict[str, list[str]], dict[str, Any]]:
    """Images of each concept alone and of all together, from the pipeline already in memory.

    Returns ``({prompt: [files]}, sampler record)``; the pipeline's tokens and scheduler are left as they were.
    """
    existing = set(pipe.tokenizer.get_vocab())
    clash = [t for t in tokens if t in existing]
    if clash:
        # A token of that name is already in the pipeline (another run's): sampling would use its embedding.
        raise ConfigError(f"tokens {clash} already exist in the loaded pipeline; unload them before sampling")
    # Leave the pipeline as it was: the next image of a dataset learns tokens of the same names.
    with run_tokens(pipe, dict(zip(tokens, embeddings))):
        prompts = [f"a photo of {t}" for t in tokens] + ["a photo of " + " and ".join(tokens)]
        gen_cfg = GenerateConfig(n=cfg.sample_count, seed=seed, steps=cfg.sample_steps, scheduler=cfg.sample_scheduler)
        images = generate(pipe, prompts, gen_cfg)
        sampler = sampler_record(pipe, gen_cfg)
    files: dict[str, list[str]] = {}
    (out / SAMPLES_DIR).mkdir(exist_ok=True)
    for name, prompt, imgs in zip([*tokens, "all"], prompts, images):
        stem = name.strip("<>")
        files[prompt] = []
        for k, img in enumerate(imgs):
            rel = f"{SAMPLES_DIR}/{stem}_{k:02d}.png"
            atomic_save_image(img, out / rel)
            files[prompt].append(rel)
    return files, sampler


class _ProgressBar:
    """tqdm bar with the current loss (a training callback)."""

    def __init__(self, total: int, start: int):
        self.bar = tqdm(total=total, initial=start, desc="learning tokens", unit="step", dynamic_ncols=True)

    def __call__(self, trainer, record: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", phase=record["phase"])

    def close(self) -> None:
        self.bar.close()

