"""The evaluation protocol of paper §4.2 over folders of finished runs (``conceptexpress evaluate RUNS …``).

For every finished run (:mod:`.runs`), in three phases so that only one family of models is in memory at a time:

1. Generate (:mod:`conceptexpress.generate`): ``images_per_concept`` images of "a photo of [V_i]" for every
   concept and ``compositional_images`` of "a photo of [V_1] and … [V_N]", image k from seed ``seed + k``, at the
   model's native size, with the released sampler by default (DDIM, 50 steps, guidance 7.5; recorded in the
   summary and the table). The base model recorded in the manifest is loaded once per distinct model and reused
   across runs; each run's tokens are loaded into it and removed again after its images. Cached in
   ``RUN/eval/generated-<key>/`` (:mod:`.cache`).
2. SAM (:mod:`.sam`): each concept's SAM mask from ``sam_points`` points of its extracted mask; cached in
   ``RUN/eval/sam-<key>/``. Identical photo + masks (e.g. BaS† runs, which use ConceptExpress's masks) are
   segmented once per evaluation.
3. Encode with each encoder and score (:mod:`.metrics`); definitions in :data:`DEFINITIONS`.

Grouping: rows of the table are the manifests' ``method`` values. All runs of one method, across every RUNS folder
given, form that method's dataset: its SIM^I is the mean over its concepts, its SIM^C the mean over its source
images, and its ACC^k is computed against the prototypes of that method's own concepts only (methods never share a
classifier). Evaluate two datasets (D1, D2) with two ``evaluate`` calls.

This module holds the options, the result and the entry point; phases 1 and 2 are in :mod:`.phases`, phase 3
and ``summary.json`` in :mod:`.scoring`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import ConfigError
from ..sampler import DEFAULT_SCHEDULER, SCHEDULERS
from .encoders import DEFAULT_CLIP, DEFAULT_DINO, ENCODERS
from .phases import _generate_all, _model_options, _sam_all
from .sam import DEFAULT_SAM
from .scoring import DEFINITIONS, _score, _summary
from .scoring import SUMMARY_FORMAT as SUMMARY_FORMAT  # re-exported: importable from here as before
from .scoring import TOPK as TOPK

__all__ = ["DEFINITIONS", "EvalConfig", "EvalResult", "evaluate_runs"]

_MAX_SEED = 2**63 - 1


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class EvalConfig:
    """Options of the evaluation protocol (paper §4.1–4.2)."""

    # Paper §4.1: "we generate 8 testing images ... using the prompt 'a photo of [V_i]'".
    images_per_concept: int = field(default=8, metadata=_help('images per concept from "a photo of [V_i]" (paper: 8)'))
    # Not stated in the paper; the same count as per concept.
    compositional_images: int = field(
        default=8, metadata=_help('images per source photo from "a photo of [V_1] and ... [V_N]"')
    )
    # One seed for the whole protocol: image k of every prompt starts from seed + k; SAM's points use it too.
    seed: int = field(default=0, metadata=_help("seed: image k of a prompt uses seed + k; also seeds SAM's points"))
    # Not stated in the paper; the released code samples with DDIM (clip_sample False, set_alpha_to_one False).
    scheduler: str = field(
        default=DEFAULT_SCHEDULER,
        metadata=_help("sampler of the evaluation images (see `generate --help`)", choices=SCHEDULERS),
    )
    # Not stated in the paper; the released code's 50 steps.
    steps: int = field(default=50, metadata=_help("denoising steps of the evaluation images"))
    # The released code's 7.5 (the SD default).
    guidance: float = field(default=7.5, metadata=_help("classifier-free guidance scale of the evaluation images"))
    # Paper §4.2 names CLIP and DINO without variants; ViT-B/32 and ViT-S/16 are the usual choices.
    clip: str = field(default=DEFAULT_CLIP, metadata=_help("CLIP model: hub id or local folder (transformers)"))
    dino: str = field(default=DEFAULT_DINO, metadata=_help("DINO ViT model: hub id or local folder (transformers)"))
    # Paper §4.2 names SAM without a variant; ViT-H is SAM's default and best model.
    sam: str = field(default=DEFAULT_SAM, metadata=_help("SAM model: hub id or local folder (transformers)"))
    # Paper §4.2: "we prompt SAM with 3 randomly sampled points on our extracted mask".
    sam_points: int = field(default=3, metadata=_help("points sampled from each extracted mask to prompt SAM (paper: 3)"))
    # Both of paper Table 1; a comma string so one flag sets it (a tuple or list is accepted from Python).
    encoders: str = field(default="clip,dino", metadata=_help("comma-separated encoders to report: clip, dino"))
    # Paper: "the training image is then masked with the SAM mask" — no crop.
    crop: bool = field(
        default=False,
        metadata=_help("crop each SAM-masked concept to its bounding box, padded to a square (off: the whole masked photo, as in the paper)"),
    )

    def __post_init__(self) -> None:
        for name in ("images_per_concept", "compositional_images", "steps", "sam_points"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(f"`{name}` must be an integer >= 1, got {v!r}")
        most = max(self.images_per_concept, self.compositional_images)
        if not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED - most:
            raise ConfigError(f"`seed` must be an integer in [0, 2**63 - 1 - images], got {self.seed!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"`scheduler` must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        g = self.guidance
        if isinstance(g, bool) or not isinstance(g, int | float) or not (math.isfinite(g) and g >= 0):
            raise ConfigError(f"`guidance` must be a finite number >= 0, got {g!r}")
        for name in ("clip", "dino", "sam"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise ConfigError(f"`{name}` must name a hub id or a local folder, got {v!r}")
        if not isinstance(self.crop, bool):
            raise ConfigError(f"`crop` must be true or false, got {self.crop!r}")
        enc = self.encoders
        if isinstance(enc, list | tuple):
            if not all(isinstance(e, str) for e in enc):
                raise ConfigError(f"`encoders` must be names such as 'clip,dino', got {enc!r}")
            enc = ",".join(enc)
        if not isinstance(enc, str):
            raise ConfigError(f"`encoders` must be a comma-separated string such as 'clip,dino', got {enc!r}")
        names = [e.strip().lower() for e in enc.split(",") if e.strip()]
        unknown = [e for e in names if e not in ENCODERS]
        if not names or unknown:
            raise ConfigError(f"`encoders` must list some of {', '.join(ENCODERS)}, got {self.encoders!r}")
        if len(set(names)) != len(names):
            raise ConfigError(f"`encoders` lists an encoder twice: {self.encoders!r}")
        object.__setattr__(self, "encoders", ",".join(names))  # normalized: "clip,dino"

    @property
    def encoder_names(self) -> tuple[str, ...]:
        """The encoders to report, in the given order (``("clip", "dino")`` by default)."""
        return tuple(self.encoders.split(","))

    def encoder_id(self, name: str) -> str:
        """The model id or folder of encoder ``name``."""
        return {"clip": self.clip, "dino": self.dino}[name]

    def generate_config(self, n: int, start: int = 0):
        """Sampling options for images ``start … start + n - 1`` of a prompt (image k from seed + k)."""
        from ..generate import GenerateConfig

        return GenerateConfig(
            n=n, seed=self.seed + start, steps=self.steps, guidance=float(self.guidance), scheduler=self.scheduler
        )


@dataclass(frozen=True)
class EvalResult:
    """What :func:`evaluate_runs` wrote (the same content as the files in ``out_dir``)."""

    out_dir: Path
    summary: dict[str, Any]  # summary.json
    concepts: list[dict[str, Any]]  # concepts.json rows
    images: list[dict[str, Any]]  # images.json rows
    table: str  # table.md
    skipped: list[dict[str, str]] = field(default_factory=list)

    def metric(self, method: str, encoder: str, name: str) -> float | None:
        """One cell of the table: ``metric("conceptexpress", "clip", "acc1")``."""
        return self.summary["methods"][method]["metrics"][encoder][name]


# ----------------------------------------------------------------------------- entry point
def evaluate_runs(
    runs_dirs: list[str | Path],
    config: EvalConfig | None = None,
    *,
    pipe_loader: Callable[[ModelConfig], Any] | None = None,
    out_dir: str | Path | None = None,
    model_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate every finished run of ``runs_dirs`` (paper §4.2) and write the result files.

    Args:
        runs_dirs: RUNS folders, each holding one run folder per photo (``RUNS/<name>/manifest.json``); a run folder
            itself is accepted too. Several folders (e.g. one per method) become rows of one table.
        config: protocol options (default :class:`EvalConfig`).
        pipe_loader: ``ModelConfig -> StableDiffusionPipeline`` (default :func:`conceptexpress.models.load_pipeline`);
            called once per distinct base model that still has images to generate, not at all when every image
            is cached.
        out_dir: where the result files go (default ``<parent of the first RUNS folder>/eval``).
        model_options: :class:`~conceptexpress.config.ModelConfig` fields overriding the manifests' base model
            (``model``, ``single_file_config``) or choosing ``device`` / ``dtype``; the device also runs SAM and
            the encoders.
        progress: show progress bars (tqdm) on stderr.

    Returns:
        :class:`EvalResult` with the rows, the summary and the table written to ``out_dir``
        (``concepts.csv/json``, ``images.csv/json``, ``table.md``, ``summary.json`` — see :mod:`.report`).

    Raises:
        InputError: a RUNS folder is missing, or no run can be evaluated. ConfigError: a bad option.
        ModelLoadError: SD, SAM or an encoder cannot be loaded. OutputError: the output folder is not writable.
    """
    from ..io.atomic import ensure_output_dir
    from ..models.loading import resolve_device
    from .encoders import build_encoder
    from .report import write_report
    from .runs import discover_runs
    from .sam import SamMasker

    config = config or EvalConfig()
    if not isinstance(config, EvalConfig):
        raise ConfigError(f"`config` must be an EvalConfig, got {type(config).__name__}")
    if isinstance(runs_dirs, str | Path):
        runs_dirs = [runs_dirs]
    # 1. Cheap checks first: options, runs and the output folder fail in a second, before any model loads.
    options = _model_options(model_options)
    device = resolve_device(options.get("device") or "auto")
    runs_dirs = [Path(p) for p in runs_dirs]
    out = Path(out_dir) if out_dir is not None else (runs_dirs[0].resolve().parent / "eval" if runs_dirs else Path("eval"))
    for name in config.encoder_names:  # a mistyped local model folder fails before hours of generation
        build_encoder(name, config.encoder_id(name)).check()
    SamMasker(config.sam).check()
    runs, skipped = discover_runs(runs_dirs, exclude=(out,))
    out = ensure_output_dir(out)
    if pipe_loader is None:
        from ..models import load_pipeline as pipe_loader

    # 2. Generation, SAM, features: one family of models in memory at a time, every expensive step cached.
    generated = _generate_all(runs, config, options, pipe_loader, progress)
    sam = _sam_all(runs, config, device, progress)
    concept_rows, image_rows = _score(runs, generated, sam, config, device, progress)

    # 3. Result files, summary.json last.
    summary = _summary(runs, skipped, concept_rows, image_rows, config, options, out)
    table = write_report(out, concept_rows, image_rows, summary)
    return EvalResult(out, summary, concept_rows, image_rows, table, skipped)
