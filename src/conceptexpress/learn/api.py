"""In memory, from a :class:`~conceptexpress.localize.result.Localization` to learned tokens (notebooks, the web UI)::

    loc = localize_concepts("photo.jpg", pipe)             # paper §3.2
    loc = loc.merge(0, 1).drop(3)                          # edits return new objects
    tokens = learn_tokens(loc, pipe, TrainConfig(steps=500), on_step=print)   # paper §3.3-3.4
    images = tokens.generate(pipe, ["a photo of <c1> on the beach"])          # the pipeline is left as found
    tokens.save("outputs/photo")                           # a run folder `conceptexpress generate` reads

Nothing is written unless :meth:`LearnedTokens.save` is called; ``conceptexpress extract`` is the same method
with a resumable run folder around it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..config import GenerateConfig, RuntimeConfig, TrainConfig, config_dict
from ..embeddings import run_tokens
from ..errors import ConfigError, NoConceptError
from ..export import write_token_files
from ..generate import generate
from ..io.manifest import RunManifest, token_names
from ..io.run_folder import RunFolder
from ..localize.result import Localization
from ..models.family import get_family
from .methods import get_method

__all__ = ["LearnedTokens", "learn_tokens"]


@dataclass(frozen=True)
class LearnedTokens:
    """Tokens learned for the concepts of one localization.

    ``embeddings`` is ``(N, D)`` float32 on the CPU, row i the token ``tokens[i]`` (``<c1>`` … by default) of
    concept i; ``history`` holds one record per training step (loss terms, phase).
    """

    tokens: tuple[str, ...]
    embeddings: torch.Tensor
    history: list[dict[str, Any]] = field(default_factory=list, repr=False)
    config: TrainConfig = field(default_factory=TrainConfig)
    method: str = "conceptexpress"
    sample_passes: int = 0
    family: str = "sd2"  # the base model's family (conceptexpress.models.family): decides the token file format
    dims: tuple[int, ...] | None = None  # each text encoder's part of a row (SDXL: 768, 1280); None: one encoder

    def as_dict(self) -> dict[str, torch.Tensor]:
        """``{token: (D,) embedding}``, what :func:`~conceptexpress.embeddings.run_tokens` loads."""
        return dict(zip(self.tokens, self.embeddings))

    def generate(self, pipe, prompts: Sequence[str], config: GenerateConfig | None = None) -> list[list[Image.Image]]:
        """Sample ``prompts`` (which name the tokens) with the tokens loaded for the call only.

        Returns one list of ``config.n`` PIL images per prompt (:func:`conceptexpress.generate.generate`).
        """
        with run_tokens(pipe, self.as_dict()):
            return generate(pipe, list(prompts), config)

    def save(self, folder: str | Path, *, base_model: str | None = None) -> RunManifest:
        """Write the token files and a complete ``manifest.json`` into ``folder`` (a run folder that
        ``conceptexpress generate FOLDER …`` and :func:`~conceptexpress.generate.generate_from_run` read).

        ``base_model`` (hub id or path) is recorded so that ``generate`` can load the right model.
        """
        run = RunFolder(folder).create()
        dims = self.dims or (int(self.embeddings.shape[-1]),)
        entries = write_token_files(run.path, list(self.tokens), self.embeddings,
                                    keys=get_family(self.family).export_keys, dims=dims)
        manifest = RunManifest.build(
            entries,
            method=self.method,
            base_model=base_model,
            family=self.family,
            embedding_dim=int(self.embeddings.shape[1]),
            config=config_dict(self.config),
            entries={
                "seed": self.config.seed,
                "steps": len(self.history),
                "sample_passes": self.sample_passes,
                "final_loss": self.history[-1]["loss"] if self.history else None,
            },
        )
        run.write_manifest(manifest)
        return manifest


def learn_tokens(
    loc: Localization,
    pipe,
    config: TrainConfig | None = None,
    *,
    runtime: RuntimeConfig | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    tokens: Sequence[str] | None = None,
    method: str = "conceptexpress",
    image: Image.Image | None = None,
) -> LearnedTokens:
    """Learn one token per concept of ``loc`` (paper §3.3–3.4), with the method named ``method``.

    ``method`` is a name of :data:`~conceptexpress.learn.methods.METHOD_REGISTRY`: ``"conceptexpress"``;
    ``"bas-dagger"`` (the BaS† baseline, paper §4.1); ``"bas"`` (Break-A-Scene's token phase with your supervision:
    ``loc`` from your masks, :meth:`ConceptLocalizer.from_masks`, and/or ``config.init_words``). ``"bas-ft"`` is
    refused here: its second phase fine-tunes the UNet and the text encoder and writes a pipeline, which needs a
    run folder (:func:`conceptexpress.extract.extract` with ``method="bas-ft"``).

    Args:
        loc: a localization of ``image`` (by default ``loc.image``, the photo it was computed from), possibly
            edited with :meth:`~Localization.merge` / :meth:`~Localization.drop`.
        pipe: the loaded pipeline that localized it; its weights are not changed and no token is added to it.
        config: the method's settings (default :class:`TrainConfig`, the paper's).
        runtime: micro-batch, precision (default ``config.runtime``); checkpoints are not written here.
        on_step: called after every step with its record (``{"step", "loss", "phase", …}``).
        tokens: placeholder names (default ``<c1> … <cN>``).

    Raises:
        NoConceptError: ``loc`` has no concept. ConfigError: a bad option, a method given what it cannot use or
        not given what it needs (:meth:`~conceptexpress.learn.methods.Method.check`), or no image to train on.
    """
    config = config or TrainConfig()
    learner = get_method(method)
    if learner.fine_tunes:
        raise ConfigError(
            f"`method` {method!r} fine-tunes the UNet and text encoder into a pipeline saved in a run folder: use "
            f"extract(image, out, RunConfig(method={method!r}, …)) (`conceptexpress extract --method {method}`)"
        )
    learner.check(config, masks=loc.num_concepts if loc.from_user_masks else None, source="the localization")
    if loc.num_concepts == 0:
        raise NoConceptError("the localization has no concept to learn a token for")
    image = image or loc.image
    if image is None:
        raise ConfigError("`image` is needed: this Localization does not carry the photo it was computed from")
    names = tuple(tokens) if tokens is not None else tuple(token_names(loc.num_concepts))
    if len(names) != loc.num_concepts:
        raise ConfigError(f"`tokens` must name {loc.num_concepts} concepts, got {len(names)}: {list(names)}")
    trainer = learner.trainer_class()(
        pipe, image.convert("RGB"), loc.work_size, loc.clusters.masks, loc.clusters.centroids, config,
        runtime=(runtime or config.runtime),
    )
    callbacks = [lambda _trainer, record: on_step(record)] if on_step is not None else []
    result = trainer.train(callbacks=callbacks)
    return LearnedTokens(
        tokens=names,
        embeddings=result.embeddings.detach().float().cpu(),
        history=list(result.history),
        config=trainer.config,
        method=method,
        sample_passes=result.sample_passes,
        family=trainer.family.name,
        dims=trainer.dims,
    )
