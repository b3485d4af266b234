"""The evaluation protocol of paper §4.2 over folders of finished runs (``conceptexpress evaluate RUNS …``).

For every finished run (:mod:`.runs`), in three phases so that only one family of models is in memory at a time:

1. Generate (:mod:`conceptexpress.generate`): ``images_per_concept`` images of "a photo of [V_i]" for every
   concept and ``compositional_images`` of "a photo of [V_1] and … [V_N]", image k from seed ``seed + k``, at the
   model's native size. The base model recorded in the manifest is loaded once per distinct model and reused
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
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import ModelConfig
from ..errors import ConfigError
from .encoders import DEFAULT_CLIP, DEFAULT_DINO, ENCODERS
from .sam import DEFAULT_SAM

__all__ = ["DEFINITIONS", "EvalConfig", "EvalResult", "evaluate_runs"]

logger = logging.getLogger(__name__)

SUMMARY_FORMAT = "conceptexpress-eval-1"
TOPK = (1, 3)  # paper Table 1 reports ACC^1 and ACC^3
_MAX_SEED = 2**63 - 1

DEFINITIONS = {
    "points": "sam_points distinct pixels drawn uniformly without replacement from the extracted mask "
    "(numpy default_rng(seed), fresh per concept), passed to SAM as pixel centres (x + 0.5, y + 0.5)",
    "sam_mask": "SAM prompted with all points at once (labels 1), multimask output; the candidate with the highest "
    "predicted IoU, upsampled to the photo and thresholded at logit 0; an empty SAM mask falls back to the "
    "extracted mask (sam_fallback = true)",
    "masked_concept": "the source photo with pixels outside the SAM mask set to black (0, 0, 0); with crop: cut to "
    "the mask's bounding box and padded with black to a centred square",
    "features": "encoder features, L2-normalized: CLIP = projected image embedding, DINO = last-layer [CLS] token; "
    "each encoder's own image processor",
    "SIM^I": "per concept: mean over its images_per_concept generations ('a photo of [V_i]') of cos(masked concept, "
    "generated); method value = mean over the method's concepts",
    "SIM^C": "per source photo: mean over its compositional_images generations ('a photo of [V_1] and ... [V_N]') of "
    "cos(whole unmasked photo, generated); method value = mean over the method's photos",
    "ACC^k": "prototypes = masked-concept features of every concept of the method's runs (one per concept); queries = "
    "every single-concept generated image of the method, labelled with its concept; a query is correct when fewer "
    "than k other prototypes have a cosine >= its own prototype's (ties count against it); method value = correct "
    "queries / queries",
}


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
    # Not stated in the paper; 50 is the diffusers default of SD pipelines.
    steps: int = field(default=50, metadata=_help("denoising steps of the evaluation images"))
    # The SD default, as for the paper's samples.
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

        return GenerateConfig(n=n, seed=self.seed + start, steps=self.steps, guidance=float(self.guidance))


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


# ----------------------------------------------------------------------------- phase 1: generation
def _model_options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    allowed = [f.name for f in fields(ModelConfig)]
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        raise ConfigError(f"`model_options` has unknown keys {unknown}; allowed: {allowed}")
    given = {k: v for k, v in (options or {}).items() if v is not None}
    ModelConfig(**given)  # a bad --device / --dtype / --model fails here, before any work
    return given


def _run_model(run, options: dict[str, Any]) -> ModelConfig:
    """The run's base model (manifest), with the user's overrides (``--model``, ``--device``, ``--dtype`` …)."""
    recorded = {"model": run.manifest.get("base_model"), "single_file_config": run.manifest.get("single_file_config")}
    return ModelConfig(**{**{k: v for k, v in recorded.items() if v is not None}, **options})


def _prompts(run, config: EvalConfig) -> list[tuple[str, str, int]]:
    """``(folder name, prompt, images)`` of a run: each concept alone, then all together."""
    tokens = run.tokens
    out = [(f"concept_{i + 1:02d}", f"a photo of {t}", config.images_per_concept) for i, t in enumerate(tokens)]
    out.append(("all", "a photo of " + " and ".join(tokens), config.compositional_images))
    return out


def _generation_cache(run, model: ModelConfig, config: EvalConfig):
    from ..extract import file_sha256
    from .cache import GeneratedCache

    key = {
        "format": "conceptexpress-eval-generated-1",
        "model": model.model,
        "single_file_config": model.single_file_config,
        "steps": config.steps,
        "guidance": float(config.guidance),
        "seed": config.seed,
        # Retraining a run in place changes its token files, hence the key: stale pictures are never reused.
        "tokens": {e["token"]: file_sha256(run.path / e["file"]) for e in run.manifest["tokens"]},
    }
    return GeneratedCache(run.path, key)


def _generate_all(runs, config: EvalConfig, options: dict[str, Any], pipe_loader: Callable, progress: bool):
    """Phase 1: make sure every run has its images; returns ``{label: {"concepts": [[Path]], "all": [Path]}}``."""
    from ..export import load_tokens_into
    from ..generate import generate
    from .progress import progress_bar

    plans = []
    for run in runs:
        model = _run_model(run, options)
        cache = _generation_cache(run, model, config)
        todo = [(name, prompt, n, cache.available(name, prompt)) for name, prompt, n in _prompts(run, config)]
        plans.append((run, model, cache, todo))
    missing = sum(max(n - have, 0) for *_, todo in plans for _, _, n, have in todo)
    # Runs of one base model together, so each model is loaded once.
    plans.sort(key=lambda p: (p[1].model, p[1].single_file_config or ""))

    out: dict[str, dict[str, Any]] = {}
    pipe, pipe_model = None, None
    with progress_bar(missing, "generate", "image", progress) as bar:
        for run, model, cache, todo in plans:
            if any(have < n for _, _, n, have in todo):
                if pipe is None or pipe_model != model:
                    pipe = None
                    _free_memory()
                    pipe, pipe_model = pipe_loader(model), model
                before = set(pipe.tokenizer.get_vocab())
                load_tokens_into(pipe, run.path)
                try:
                    for name, prompt, n, have in todo:
                        if have >= n:
                            continue
                        images = generate(pipe, [prompt], config.generate_config(n - have, start=have))[0]
                        extra = {
                            "seeds": [config.seed + i for i in range(n)],
                            "model": model.model,
                            "device": str(getattr(pipe, "device", "")),
                            "dtype": str(getattr(pipe, "dtype", "")).removeprefix("torch."),
                        }
                        cache.extend(name, prompt, have, images, extra)
                        bar.update(n - have)
                finally:
                    # The next run's tokens have the same names (<c1>, …): remove this run's before loading them.
                    added = [t for t in pipe.tokenizer.get_vocab() if t not in before]
                    if added:
                        pipe.unload_textual_inversion(added)
            names = {name: n for name, _, n, _ in todo}
            out[run.label] = {
                "root": cache.root,
                "concepts": [cache.paths(name, names[name]) for name, *_ in todo[:-1]],
                "all": cache.paths("all", names["all"]),
            }
    del pipe
    _free_memory()
    return out


def _free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- phase 2: SAM
def _sam_all(runs, config: EvalConfig, device, progress: bool) -> dict[str, list[dict[str, Any]]]:
    """Phase 2: every concept's SAM mask; returns ``{label: [{"mask", "points", "score", "fallback", "area"}]}``."""
    from ..extract import file_sha256
    from .cache import EVAL_DIR, cache_key, read_sam_cache, write_sam_cache
    from .progress import progress_bar
    from .runs import load_masks, load_source
    from .sam import SamMasker

    jobs = []
    for run in runs:
        key = {
            "format": "conceptexpress-eval-sam-1",
            "sam": config.sam,
            "points": config.sam_points,
            "seed": config.seed,
            "image_sha256": run.image_sha256,
            "masks": [file_sha256(p) for p in run.masks],
        }
        folder = run.path / EVAL_DIR / f"sam-{cache_key(key)}"
        jobs.append((run, key, folder, read_sam_cache(folder, key, len(run.masks))))

    out: dict[str, list[dict[str, Any]]] = {}
    memo: dict[str, list[dict[str, Any]]] = {}  # same photo and masks (another method's run): segment once
    masker = None
    with progress_bar(sum(c is None for *_, c in jobs), "sam", "image", progress) as bar:
        for run, key, folder, cached in jobs:
            if cached is None:
                memo_key = cache_key(key)
                if memo_key not in memo:
                    masker = masker or SamMasker(config.sam, device=device)
                    masks = load_masks(run)
                    preds = masker.masks_from_points(load_source(run), masks, config.sam_points, config.seed)
                    concepts = []
                    for pred, extracted in zip(preds, masks):
                        fallback = not pred.mask.any()
                        if fallback:
                            logger.warning("%s: SAM returned an empty mask for a concept; using the extracted mask", run.label)
                        mask = extracted if fallback else pred.mask
                        concepts.append(
                            {
                                "mask": mask,
                                "points": pred.points.tolist(),
                                "score": pred.score,
                                "fallback": fallback,
                                "area": float(mask.mean()),
                            }
                        )
                    memo[memo_key] = concepts
                concepts = [{**c, "token": t} for c, t in zip(memo[memo_key], run.tokens)]
                write_sam_cache(folder, key, concepts)
                cached = concepts
                bar.update(1)
            out[run.label] = cached
    if masker is not None:
        masker.unload()
    _free_memory()
    return out


# ----------------------------------------------------------------------------- phase 3: features and metrics
def _open_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def _encode_run(encoder, run, generated: dict[str, Any], sam: list[dict[str, Any]], crop: bool):
    """Features of one run: source ``(D,)``, masked concepts ``(N, D)``, per-concept generations ``[(K, D)]``,
    compositional generations ``(K', D)``."""
    from .runs import load_source
    from .sam import masked_concept_image

    source = load_source(run)
    masked = [masked_concept_image(source, c["mask"], crop) for c in sam]
    per_concept = [[_open_rgb(p) for p in paths] for paths in generated["concepts"]]
    comp = [_open_rgb(p) for p in generated["all"]]
    feats = encoder.encode([source, *masked, *(im for ims in per_concept for im in ims), *comp])  # (1+N+ΣK+K', D)
    n = len(masked)
    gen, start = [], 1 + n
    for ims in per_concept:
        gen.append(feats[start : start + len(ims)])
        start += len(ims)
    return feats[0], feats[1 : 1 + n], gen, feats[start:]


def _score(runs, generated, sam, config: EvalConfig, device, progress: bool):
    import torch

    from .encoders import build_encoder
    from .metrics import compositional_similarity, identity_similarity, topk_correct
    from .progress import progress_bar

    concept_rows: list[dict[str, Any]] = []
    image_rows: list[dict[str, Any]] = []
    methods = list(dict.fromkeys(r.method for r in runs))
    for enc_name in config.encoder_names:
        enc_id = config.encoder_id(enc_name)
        encoder = build_encoder(enc_name, enc_id, device=device)
        feats = {}
        with progress_bar(len(runs), f"encode {enc_name}", "image", progress) as bar:
            for run in runs:
                feats[run.label] = _encode_run(encoder, run, generated[run.label], sam[run.label], config.crop)
                bar.update(1)
        encoder.unload()
        for method in methods:
            mruns = [r for r in runs if r.method == method]
            # The method's classifier: one prototype per concept of its runs (paper §4.2, ACC^k).
            prototypes = torch.cat([feats[r.label][1] for r in mruns])  # (P, D)
            # Queries: every generated single-concept image, labelled with its concept's prototype row.
            gens = [g for r in mruns for g in feats[r.label][2]]  # P tensors (K, D), prototype order
            q = torch.cat(gens)  # (Q, D)
            y = torch.cat([torch.full((g.shape[0],), j) for j, g in enumerate(gens)])  # (Q,)
            correct = {k: topk_correct(q, y, prototypes, k) for k in TOPK}  # (Q,) bool each
            label = 0
            for r in mruns:
                source, masked, gen, comp = feats[r.label]
                for i, (token, g) in enumerate(zip(r.tokens, gen)):
                    hits = y == label  # this concept's queries
                    label += 1
                    s = sam[r.label][i]
                    concept_rows.append(
                        {
                            "method": method,
                            "run": r.label,
                            "token": token,
                            "concept": i + 1,
                            "encoder": enc_name,
                            "encoder_model": enc_id,
                            "sim_i": identity_similarity(masked[i], g),
                            "images": int(g.shape[0]),
                            "top1_correct": int(correct[1][hits].sum()),
                            "top3_correct": int(correct[3][hits].sum()),
                            "prototypes": int(prototypes.shape[0]),
                            "sam_score": float(s["score"]),
                            "sam_area": float(s["area"]),
                            "sam_fallback": bool(s["fallback"]),
                        }
                    )
                per_image = [compositional_similarity(source, c[None]) for c in comp]
                image_rows.append(
                    {
                        "method": method,
                        "run": r.label,
                        "image": str(r.image),
                        "encoder": enc_name,
                        "encoder_model": enc_id,
                        "sim_c": compositional_similarity(source, comp),
                        "images": int(comp.shape[0]),
                        "per_image": per_image,
                    }
                )
    return concept_rows, image_rows


def _mean(values: list[float]) -> float | None:
    return float(sum(values) / len(values)) if values else None


def _summary(runs, skipped, concept_rows, image_rows, config: EvalConfig, options, out: Path) -> dict[str, Any]:
    from ..io.localization_files import versions

    methods: dict[str, Any] = {}
    for method in dict.fromkeys(r.method for r in runs):
        mruns = [r for r in runs if r.method == method]
        metrics = {}
        for enc in config.encoder_names:
            crows = [c for c in concept_rows if c["method"] == method and c["encoder"] == enc]
            irows = [i for i in image_rows if i["method"] == method and i["encoder"] == enc]
            queries = sum(c["images"] for c in crows)
            metrics[enc] = {
                "sim_i": _mean([c["sim_i"] for c in crows]),
                "sim_c": _mean([i["sim_c"] for i in irows]),
                "acc1": sum(c["top1_correct"] for c in crows) / queries if queries else None,
                "acc3": sum(c["top3_correct"] for c in crows) / queries if queries else None,
                "queries": queries,
                "prototypes": len(crows),
            }
        methods[method] = {
            "runs": len(mruns),
            "concepts": sum(len(r.tokens) for r in mruns),
            "base_models": sorted({_run_model(r, options).model for r in mruns}),
            "metrics": metrics,
        }
    return {
        "format": SUMMARY_FORMAT,
        "complete": True,
        "num_runs": len(runs),
        "num_concepts": sum(len(r.tokens) for r in runs),
        "encoders": {name: config.encoder_id(name) for name in config.encoder_names},
        "sam": config.sam,
        "config": asdict(config),
        "model_options": options,
        "definitions": DEFINITIONS,
        "methods": methods,
        "runs": [
            {"run": r.label, "method": r.method, "path": str(r.path.resolve()), "image": str(r.image), "concepts": len(r.tokens)}
            for r in runs
        ],
        "skipped": skipped,
        "files": {
            "concepts": ["concepts.csv", "concepts.json"],
            "images": ["images.csv", "images.json"],
            "table": "table.md",
        },
        "out": str(out.resolve()),
        "versions": versions(),
    }


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
