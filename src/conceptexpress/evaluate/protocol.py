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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import EvalConfig, ModelConfig
from ..errors import ConfigError
from ..io.atomic import ensure_output_dir
from ..models import load_pipeline, resolve_device
from .encoders import build_encoder
from .phases import check_model_options, generate_all, sam_all
from .report import write_report
from .runs import discover_runs
from .sam import SamMasker
from .scoring import DEFINITIONS, build_summary, score_runs

__all__ = ["DEFINITIONS", "EvalConfig", "EvalResult", "evaluate_runs"]


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
    config = config or EvalConfig()
    if not isinstance(config, EvalConfig):
        raise ConfigError(f"`config` must be an EvalConfig, got {type(config).__name__}")
    if isinstance(runs_dirs, str | Path):
        runs_dirs = [runs_dirs]
    # 1. Cheap checks first: options, runs and the output folder fail in a second, before any model loads.
    options = check_model_options(model_options)
    device = resolve_device(options.get("device") or "auto")
    runs_dirs = [Path(p) for p in runs_dirs]
    out = Path(out_dir) if out_dir is not None else (runs_dirs[0].resolve().parent / "eval" if runs_dirs else Path("eval"))
    for name in config.encoder_names:  # a mistyped local model folder fails before hours of generation
        build_encoder(name, config.encoder_id(name)).check()
    SamMasker(config.sam).check()
    runs, skipped = discover_runs(runs_dirs, exclude=(out,))
    out = ensure_output_dir(out)
    pipe_loader = pipe_loader or load_pipeline

    # 2. Generation, SAM, features: one family of models in memory at a time, every expensive step cached.
    generated = generate_all(runs, config, options, pipe_loader, progress)
    sam = sam_all(runs, config, device, progress)
    concept_rows, image_rows = score_runs(runs, generated, sam, config, device, progress)

    # 3. Result files, summary.json last.
    summary = build_summary(runs, skipped, concept_rows, image_rows, config, options, out)
    table = write_report(out, concept_rows, image_rows, summary)
    return EvalResult(out, summary, concept_rows, image_rows, table, skipped)
