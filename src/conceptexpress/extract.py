"""Localization + token learning + export for one photo (``conceptexpress extract``; layout in README "Outputs").

The run folder (:class:`~conceptexpress.io.run_folder.RunFolder`) grows in stages, each finished stage marked by
a file written last:

    localization.json   localization done (reused by later runs with the same image, model and config)
    checkpoints/        resumable training state (``--resume``)
    pipeline/           ``method="bas-ft"`` only: the fine-tuned pipeline, written before the manifest
    manifest.json       tokens exported; ``"complete": true`` only once everything is written

so an interrupted run never leaves a folder that looks complete, and ``--resume`` loses nothing finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .baselines.bas_ft import BaSFineTuner, training_copy
from .config import METHODS, GenerateConfig, ModelConfig, RunConfig, SampleConfig, TrainConfig, config_dict
from .embeddings import run_tokens
from .errors import ConfigError, NoConceptError
from .export import write_token_files
from .generate import generate, sampler_record
from .io.manifest import RunManifest, token_names
from .io.run_folder import RunFolder
from .io.run_options import model_record, run_options
from .learn.methods import get_method
from .learn.trainer import TokenTrainer, loss_curve_image, released_sample_passes
from .localization_stage import Photo, localization_of
from .models import load_pipeline
from .models.family import family_of

__all__ = ["METHODS", "RunConfig", "SampleConfig", "extract"]


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

    The run folder is locked for the whole call (:meth:`RunFolder.lock <conceptexpress.io.run_folder.RunFolder.lock>`):
    a second process on the same folder gets :class:`~conceptexpress.io.lock.RunLockedError` at once, or waits with ``config.wait``.
    ``config.lock=False`` is for a caller that already holds the folder's lock (the web UI).

    ``config.runtime`` (micro-batch, precision, checkpoints) defaults to ``train.runtime``; it is not part of the
    method, so ``resume=True`` accepts a different one.

    A folder holds one run (:meth:`RunFolder.start_run <conceptexpress.io.run_folder.RunFolder.start_run>`). When it holds a run made with other options
    (image, model, method, user masks, ``LocalizeConfig``, ``TrainConfig``, ``FineTuneConfig`` for ``"bas-ft"``),
    the call refuses with :class:`~conceptexpress.errors.OutputError`, unless ``config.overwrite``: then the old
    run's outputs are removed first and a new run starts (also with ``resume``, which then only resumes a run of
    the same options). Without ``resume``, a rerun with the same options is a new run too: the old run's trained
    outputs are removed before training; a matching localization is reused.
    """
    config = _with_model(config or RunConfig(), pipe)
    method = get_method(config.method)

    # 1. Cheap checks first (method, image, masks, output folder), then the model.
    photo = Photo.open(image_path, config.masks)
    user_masks = photo.user_masks
    method.check(config.train, masks=user_masks.num_concepts if user_masks else None,
                 source=f"`masks` {str(user_masks.folder)!r}" if user_masks else "`masks`")
    run = RunFolder(out_dir).create()
    with run.lock(wait=config.wait) if config.lock else contextlib.nullcontext():
        resume = _start_run(run, photo, config)
        if pipe is None:
            pipe = load_pipeline(config.model)

        # 2. Localization, once per image (reused when image, model, config and user masks match).
        loc_manifest, tensors = localization_of(pipe, photo, run, config)
        if int(loc_manifest["num_concepts"]) == 0:
            raise NoConceptError(f"no salient concept found in {str(image_path)!r}; see {run / run.STAGES}")
        # 3. Token learning (resumable), then Break-A-Scene's phase 2 for a method that fine-tunes.
        learned = _learn(pipe, photo, run, config, (loc_manifest, tensors), resume=resume, callbacks=callbacks)
        # 4. Export: one diffusers file and one A1111/ComfyUI file per concept, loss curve, the photo's copy.
        entries = _export(run, photo, loc_manifest, learned)
        # 5. Samples of each concept alone and all together, from the pipeline in memory.
        samples = (
            _write_samples(learned.sample_pipe, run, token_names(len(entries)), learned.result.embeddings,
                           config.sample, config.train.seed)
            if config.sample.samples else ({}, None)
        )
        # 6. The manifest, last: the run is complete once it lands.
        manifest = _manifest(photo, config, entries, learned, samples)
        run.write_manifest(manifest)
        return manifest


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


def _start_run(run: RunFolder, photo: Photo, config: RunConfig) -> bool:
    """Make ``run`` hold this run only (a resume of it, or a new one; refusals before the model loads); returns
    whether to resume."""
    model, fine_tunes = config.model, get_method(config.method).fine_tunes
    options = run_options(
        image_sha256=photo.sha256, model=model_record(model.model), single_file_config=model.single_file_config,
        method=config.method, masks_sha256=photo.masks_sha256,
        configs=config_dict(config.localize, config.train, *([config.finetune] if fine_tunes else [])),
    )
    resume = run.start_run(options, resume=config.resume, overwrite=config.overwrite)
    run.keep_edits(image_sha256=photo.sha256, model=model.model, localize=config.localize,
                   masks_sha256=photo.masks_sha256, overwrite=config.overwrite)
    (run / run.MANIFEST).unlink(missing_ok=True)  # until the new manifest lands, the run is not complete
    if not fine_tunes:
        shutil.rmtree(run / run.PIPELINE_DIR, ignore_errors=True)  # a previous bas-ft run's model, no longer referenced
    return resume


def _learn(pipe, photo: Photo, run: RunFolder, config: RunConfig, localization, *, resume: bool,
           callbacks) -> _Learned:
    """Token learning with the method's trainer (resumable from ``RUN/checkpoints``), then, for a method that
    fine-tunes (bas-ft), Break-A-Scene's phase 2 on fp32 copies of the UNet and text encoder, saved as
    ``RUN/pipeline/``. ``localization`` is the (manifest, tensors) pair of the run's localization."""
    loc_manifest, tensors = localization
    method = get_method(config.method)
    runtime = config.runtime_or_default
    trainer = method.trainer_class()(
        pipe, photo.image, tuple(loc_manifest["work_size"]), tensors["masks"].bool(), tensors["centroids"],
        config.train, runtime=runtime,
    )
    result = _train(trainer, run / run.CHECKPOINTS_DIR, resume, config.progress, callbacks)
    if not method.fine_tunes:
        return _Learned(result, trainer.config, pipe, None)
    ft_pipe, result, fine_tune = _finetune(
        pipe, photo.image, localization, trainer.config, runtime, config, result, run, callbacks
    )
    model = config.model
    fine_tune = {"base_model": model_record(model.model), "single_file_config": model.single_file_config, **fine_tune}
    return _Learned(result, trainer.config, ft_pipe, fine_tune)


def _export(run: RunFolder, photo: Photo, loc_manifest: dict[str, Any], learned: _Learned) -> list[dict[str, Any]]:
    """The token files (diffusers and A1111/ComfyUI), history, loss curve and the photo's copy; returns the
    manifest's token entries (with each concept's mask file)."""
    result, family = learned.result, family_of(learned.sample_pipe)
    entries = write_token_files(run.path, token_names(int(loc_manifest["num_concepts"])), result.embeddings,
                                keys=family.export_keys, dims=family.embedding_dims(learned.sample_pipe))
    for entry, mask in zip(entries, loc_manifest["masks"]):
        entry["mask"] = mask
    run.write_training_record(result.history, loss_curve_image(result.history))
    run.copy_source(photo.path, photo.sha256)
    return entries


def _manifest(photo: Photo, config: RunConfig, entries: list[dict[str, Any]], learned: _Learned,
              samples: tuple[dict[str, list[str]], dict[str, Any] | None]) -> RunManifest:
    """The run's manifest (``"complete": true``; :meth:`RunManifest.build` sets the fields every run has)."""
    model, result, fine_tune, user_masks = config.model, learned.result, learned.fine_tune, photo.user_masks
    sample_files, sampler = samples
    # The sampler the samples used (SampleConfig's None = the family's), as the config actually used.
    sample = config.sample if sampler is None else dataclasses.replace(config.sample, sample_scheduler=sampler["scheduler"])
    return RunManifest.build(
        entries,
        method=config.method,
        # A local model is recorded by absolute path so `generate` finds it from any working directory; a bas-ft
        # run's is its own RUN/pipeline/, relative to the run folder (``generate.run_model_config`` resolves it).
        base_model=RunFolder.PIPELINE_DIR if fine_tune is not None else model_record(model.model),
        family=family_of(learned.sample_pipe).name,
        embedding_dim=int(result.embeddings.shape[1]),
        # The config actually used (FineTuneConfig only where it was).
        config=config_dict(model, config.localize, learned.train, config.runtime_or_default, sample,
                           *([config.finetune] if fine_tune else [])),
        entries={
            "image": str(photo.path.resolve()),
            "image_sha256": photo.sha256,
            "source_image": RunFolder.source_name(photo.path),  # the photo's bytes inside the run: what evaluate reads
            "single_file_config": None if fine_tune is not None else model.single_file_config,
            "fine_tune": fine_tune,  # bas-ft: the model it started from, the phase's settings and cost
            # --masks: the user's mask files (None: the localization's masks); init words are in TrainConfig.
            "user_masks": None if user_masks is None else {
                "folder": str(user_masks.folder.resolve()), "files": list(user_masks.files),
                "sha256": user_masks.sha256,
            },
            "seed": config.train.seed,
            "steps": result.steps,
            "sample_passes": result.sample_passes,
            "optimizer_steps": result.optimizer_steps,
            "skipped_steps": result.skipped_steps,  # fp16 steps dropped by loss scaling (overflow); 0 in bf16/fp32
            "released_code_sample_passes": (
                released_sample_passes(len(entries), config.train) if get_method(config.method).merge_schedule
                else None
            ),
            "final_loss": result.history[-1]["loss"] if result.history else None,
            "localization": RunFolder.LOCALIZATION,
            "overlay": RunFolder.OVERLAY,
            "loss_curve": RunFolder.LOSS_CURVE,
            "history": RunFolder.HISTORY,
            "samples": sample_files,
            "sampler": sampler,  # scheduler, its config, steps, guidance, size of the samples (None: no samples)
        },
    )


def _finetune(pipe, image, localization, train: TrainConfig, runtime, config: RunConfig, result, run: RunFolder,
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
        "pipeline": run.write_pipeline(ft_pipe),
        "steps": phase2.steps,
        "lr": finetune.finetune_lr,
        "text_encoder": finetune.finetune_text_encoder,
        "sample_passes": phase2.sample_passes,
        "final_loss": phase2.history[-1]["loss"] if phase2.history else None,
    }
    return ft_pipe, combined, entries


def _train(trainer: TokenTrainer, checkpoint_dir: Path | None, resume: bool, progress: bool, callbacks=()):
    """Run ``trainer`` with a progress bar (when asked), the caller's ``callbacks`` and resumable checkpoints;
    returns its TrainResult."""
    bars = [_ProgressBar(trainer.config.steps, trainer.step)] if progress else []
    try:
        return trainer.train(checkpoint_dir=checkpoint_dir, resume=resume, callbacks=[*bars, *callbacks])
    finally:
        for bar in bars:
            bar.close()


def _write_samples(
    pipe, run: RunFolder, tokens, embeddings: torch.Tensor, cfg: SampleConfig, seed: int
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
    files = {prompt: [run.write_sample(img, name.strip("<>"), k) for k, img in enumerate(imgs)]
             for name, prompt, imgs in zip([*tokens, "all"], prompts, images)}
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

