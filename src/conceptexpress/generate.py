"""Generate images with the learned tokens of a run (``conceptexpress generate RUN "a photo of <c1>"``).

The sampler is the released code's by default (:mod:`conceptexpress.sampler`: DDIM, 50 steps, guidance 7.5, the
model's native size, seeds 0…n−1). Each image ``i`` of a prompt starts from noise drawn by its own CPU
``torch.Generator`` seeded with ``seed + i``: the pictures do not depend on batch size, device or the other prompts, and image ``i`` of two
prompts starts from the same noise, so prompts compare side by side. Outputs::

    RUN/generated/<slug-of-prompt>/000.png 001.png …   one file per image
    RUN/generated/<slug-of-prompt>/grid.png            all images of the prompt
    RUN/generated/<slug-of-prompt>/generation.json     prompt, seeds, sampler, config, model — written last
"""

from __future__ import annotations

import argparse
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import ModelConfig
from .errors import ConfigError
from .sampler import DEFAULT_SCHEDULER, SCHEDULERS

if TYPE_CHECKING:
    from PIL import Image

GENERATED_DIR = "generated"
RECORD = "generation.json"
_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; seed + i must stay in range
# Angle-bracketed words are placeholders by convention (<c1>, <cat-toy>); one the run lacks is a typo.
_TOKEN_LIKE = re.compile(r"<[A-Za-z0-9_.\-]+>")
_SLUG_MAX = 60
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class GenerateConfig:
    """Sampling options of ``generate`` (diffusers ``StableDiffusionPipeline.__call__``)."""

    # Four samples per prompt: enough to judge a concept, one 2 × 2 grid.
    n: int = field(default=4, metadata=_help("images per prompt"))
    # Image i uses seed + i, so a seed reproduces every picture whatever the batch size.
    seed: int = field(default=0, metadata=_help("random seed; image i of every prompt uses seed + i"))
    # Released code (infer.py): DDIM (clip_sample False, set_alpha_to_one False) from the model's own schedule.
    scheduler: str = field(
        default=DEFAULT_SCHEDULER,
        metadata=_help("sampler: ddim (released code), pipeline (the model's own, PNDM for SD 2.1-base), pndm, "
                       "dpmsolver, euler", choices=SCHEDULERS),
    )
    # Released code: 50 DDIM steps.
    steps: int = field(default=50, metadata=_help("denoising steps"))
    # Released code: 7.5, the SD default; 1 turns classifier-free guidance off.
    guidance: float = field(default=7.5, metadata=_help("classifier-free guidance scale"))
    # None = the model's native size (UNet sample_size × VAE factor: 512 for SD 2.1-base).
    height: int | None = field(default=None, metadata=_help("image height in pixels, a multiple of 8; None = the model's native size"))
    width: int | None = field(default=None, metadata=_help("image width in pixels, a multiple of 8; None = the model's native size"))
    negative_prompt: str = field(default="", metadata=_help("what to steer away from (empty: none)"))

    def __post_init__(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not is_int(self.n) or self.n < 1:
            raise ConfigError(f"`n` must be an integer >= 1, got {self.n!r}")
        if not is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED - self.n:
            raise ConfigError(f"`seed` must be an integer in [0, 2**63 - 1 - n], got {self.seed!r}")
        if not is_int(self.steps) or self.steps < 1:
            raise ConfigError(f"`steps` must be an integer >= 1, got {self.steps!r}")
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(f"`scheduler` must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        if not isinstance(self.guidance, int | float) or isinstance(self.guidance, bool) or not (
            math.isfinite(self.guidance) and self.guidance >= 0
        ):
            raise ConfigError(f"`guidance` must be a finite number >= 0, got {self.guidance!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 64 or v % 8):
                raise ConfigError(f"`{name}` must be a multiple of 8 and >= 64 pixels, got {v!r}")
        if not isinstance(self.negative_prompt, str):
            raise ConfigError(f"`negative_prompt` must be a string, got {self.negative_prompt!r}")


# ----------------------------------------------------------------------------- prompts
def expand_prompt(prompt: str, tokens: list[str]) -> str:
    """Resolve the shorthands of the command line and check the tokens a prompt names.

    ``"all"`` → ``"a photo of <c1> and <c2> and …"``; a bare token ``"<c2>"`` → ``"a photo of <c2>"``;
    anything else is returned stripped.

    Raises:
        ConfigError: the prompt is empty, or names an angle-bracketed token (``<c7>``) the run does not have.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"prompt must be a non-empty string, got {prompt!r}")
    text = prompt.strip()
    if text.lower() == "all":
        if not tokens:
            raise ConfigError("prompt 'all' needs a run with at least one token, the run has none")
        return "a photo of " + " and ".join(tokens)
    unknown = [t for t in dict.fromkeys(_TOKEN_LIKE.findall(text)) if t not in tokens]
    if unknown:
        raise ConfigError(
            f"prompt {prompt!r} names {', '.join(unknown)}, which the run does not have; "
            f"its tokens are {', '.join(tokens) or '(none)'}"
        )
    if text in tokens:
        return f"a photo of {text}"
    return text


def prompt_slug(prompt: str, max_len: int = _SLUG_MAX) -> str:
    """Folder name for ``prompt``: lowercase ASCII letters, digits and ``-``, at most ``max_len`` characters."""
    ascii_text = unicodedata.normalize("NFKD", prompt).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text.lower()).strip("-")
    if len(slug) > max_len:
        cut = slug[:max_len]
        # Cut at a word boundary when one is reasonably close, so folder names stay readable.
        slug = cut.rsplit("-", 1)[0] if "-" in cut[max_len // 2 :] else cut
        slug = slug.strip("-")
    slug = slug or "prompt"
    return slug + "-" if slug in _WINDOWS_RESERVED else slug


def _recorded_prompt(folder: Path) -> str | None:
    import json

    try:
        return json.loads((folder / RECORD).read_text(encoding="utf-8")).get("prompt")
    except (OSError, ValueError, AttributeError):
        return None


def prompt_folders(out_root: str | Path, prompts: list[str]) -> list[Path]:
    """Folder of each (expanded) prompt under ``out_root``: ``<slug>``, or ``<slug>-2``, … when taken.

    A folder is taken when another prompt of the list got it, or when its ``generation.json`` records a
    different prompt; the same prompt therefore gets the same folder on every run (and overwrites it), while
    two prompts that share a truncated slug never mix. Deterministic: call it again after generating to find
    the folders.
    """
    root = Path(out_root)
    taken: set[str] = set()
    out = []
    for prompt in prompts:
        base = prompt_slug(prompt)
        k = 1
        while True:
            name = base if k == 1 else f"{base}-{k}"
            recorded = _recorded_prompt(root / name)
            if name not in taken and (recorded is None or recorded == prompt):
                break
            k += 1
        taken.add(name)
        out.append(root / name)
    return out


# ----------------------------------------------------------------------------- sampling
def generate(pipe, prompts: list[str], config: GenerateConfig | None = None) -> list[list[Image.Image]]:
    """Sample ``config.n`` images for each prompt (already expanded; tokens already loaded into ``pipe``).

    The ``n`` images of a prompt run as one batch (``2n`` UNet rows with guidance); image ``i`` starts from
    noise of a CPU generator seeded ``config.seed + i``. ``config.scheduler`` replaces ``pipe.scheduler`` for the
    call only: the pipeline is handed back with its own scheduler.

    Returns:
        One list of ``n`` RGB PIL images per prompt, in order, each ``width × height`` (model native by default).
    """
    import torch

    from .sampler import using_scheduler

    config = config or GenerateConfig()
    if isinstance(prompts, str) or not prompts:
        raise ConfigError(f"`prompts` must be a non-empty list of strings, got {prompts!r}")
    results = []
    with using_scheduler(pipe, config.scheduler):
        for prompt in prompts:
            # CPU generators: the same noise on cuda, mps and cpu (diffusers draws on CPU and moves it).
            generators = [torch.Generator("cpu").manual_seed(config.seed + i) for i in range(config.n)]
            out = pipe(
                prompt=prompt,
                negative_prompt=config.negative_prompt or None,
                num_images_per_prompt=config.n,
                generator=generators,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                height=config.height,
                width=config.width,
                output_type="pil",
            )
            results.append([img.convert("RGB") for img in out.images])
    return results


def sampler_record(pipe, config: GenerateConfig) -> dict[str, Any]:
    """What a run records about how its pictures were sampled (:func:`conceptexpress.sampler.describe`)."""
    from .sampler import build_scheduler, describe

    scheduler = build_scheduler(pipe.scheduler, config.scheduler)
    record = describe(scheduler, config.scheduler, config.steps, config.guidance)
    unet = pipe.unet.config
    native = int(unet.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    record["size"] = [config.width or native, config.height or native]  # (W, H) in pixels
    return record


def image_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile ``images`` row by row into one RGB picture (``cols`` default: ceil(sqrt(n)), so 4 → 2 × 2).

    Cells take the largest width and height; smaller images sit at their cell's top-left on black.
    """
    from PIL import Image

    if not images:
        raise ValueError("`images` must hold at least one image, got an empty list")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    if not isinstance(cols, int) or cols < 1:
        raise ValueError(f"`cols` must be a positive integer, got {cols!r}")
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


# ----------------------------------------------------------------------------- a run folder end to end
def _save_prompt(folder: Path, images: list[Image.Image], record: dict[str, Any]) -> None:
    from .io.atomic import atomic_save_image, atomic_write_json, ensure_output_dir

    ensure_output_dir(folder)
    # Invalidate the previous result first: until the new record lands the folder must not look complete,
    # and a rerun with a smaller n must not leave old pictures behind.
    (folder / RECORD).unlink(missing_ok=True)
    for stale in folder.glob("[0-9][0-9][0-9]*.png"):
        stale.unlink()
    digits = max(3, len(str(len(images) - 1)))
    names = [f"{i:0{digits}d}.png" for i in range(len(images))]
    for name, img in zip(names, images):
        atomic_save_image(img, folder / name)
    atomic_save_image(image_grid(images), folder / "grid.png")
    atomic_write_json(folder / RECORD, {**record, "images": names, "grid": "grid.png"})


def generate_from_run(
    run_dir: str | Path,
    prompts: list[str],
    config: GenerateConfig | None = None,
    *,
    pipe=None,
    out_dir: str | Path | None = None,
    model_options: Mapping[str, Any] | None = None,
) -> Path:
    """Load a finished run's tokens, sample every prompt and write the images (module docstring layout).

    Args:
        run_dir: a finished run folder (``manifest.json`` with ``"complete": true``).
        prompts: prompts in which the run's tokens appear, or the shorthands ``"all"`` / ``"<c2>"``
            (see :func:`expand_prompt`).
        config: sampling options (default :class:`GenerateConfig`).
        pipe: an already loaded pipeline of the run's base model; used as is (not reloaded), and the run's
            tokens are added to it.
        out_dir: where the per-prompt folders go (default ``RUN/generated``).
        model_options: :class:`~conceptexpress.config.ModelConfig` fields (``device``, ``dtype``, ``model``,
            ``single_file_config``) overriding the manifest's base model; ignored when ``pipe`` is given.

    Returns:
        The output root; prompt ``p`` is in ``prompt_folders(root, [expand_prompt(p, tokens)])[0]``.

    Raises:
        InputError: the run is missing, incomplete or damaged. ConfigError: a bad option or a prompt naming
        a token the run lacks. ModelLoadError / OutputError: the model or the output folder.
    """
    from . import __version__
    from .export import load_tokens_into, read_manifest
    from .io.atomic import ensure_output_dir

    config = config or GenerateConfig()
    if isinstance(prompts, str) or not prompts:
        raise ConfigError(f"`prompts` must be a non-empty list of strings, got {prompts!r}")
    # 1. Cheap checks first: a bad run, prompt or output folder fails before the model loads.
    run = Path(run_dir)
    manifest = read_manifest(run)
    tokens = [entry["token"] for entry in manifest["tokens"]]
    expanded = list(dict.fromkeys(expand_prompt(p, tokens) for p in prompts))  # duplicates would redo work
    root = ensure_output_dir(out_dir if out_dir is not None else run / GENERATED_DIR)
    model_cfg = _model_config(manifest, model_options)

    # 2. Model and tokens.
    model_name = manifest.get("base_model")  # what a passed pipeline is assumed to be
    if pipe is None:
        from .models import load_pipeline

        pipe = load_pipeline(model_cfg)
        model_name = model_cfg.model
    load_tokens_into(pipe, run)

    # 3. Sample and write, one prompt at a time so a long job keeps what it finished.
    sampler = sampler_record(pipe, config)
    for prompt, folder in zip(expanded, prompt_folders(root, expanded)):
        images = generate(pipe, [prompt], config)[0]
        _save_prompt(
            folder,
            images,
            {
                "prompt": prompt,
                "seeds": [config.seed + i for i in range(config.n)],
                "sampler": sampler,
                "run": str(run.resolve()),
                "model": model_name,
                "config": asdict(config),
                "conceptexpress": __version__,
            },
        )
    return root


def _manifest_model(manifest: dict[str, Any]) -> dict[str, Any]:
    """The ModelConfig fields a run's manifest records (its base model, and configs of a single file)."""
    base = {"model": manifest.get("base_model"), "single_file_config": manifest.get("single_file_config")}
    return {k: v for k, v in base.items() if v is not None}


def _model_config(manifest: dict[str, Any], options: Mapping[str, Any] | None) -> ModelConfig:
    allowed = [f.name for f in fields(ModelConfig)]
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        raise ConfigError(f"`model_options` has unknown keys {unknown}; allowed: {allowed}")
    given = {k: v for k, v in (options or {}).items() if v is not None}
    return ModelConfig(**{**_manifest_model(manifest), **given})


# ----------------------------------------------------------------------------- command line
def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``generate RUN_DIR PROMPT [PROMPT ...]`` on ``subparsers`` (from ``add_subparsers``).

    Sampling flags come from :class:`GenerateConfig` (``-n`` is short for ``--n``), model flags from
    :class:`~conceptexpress.config.ModelConfig` with the run's base model as default. Sets ``func`` to a
    handler that returns the exit code.
    """
    from .cli import add_config_args, add_run_model_args

    p = subparsers.add_parser(
        "generate",
        help="generate images with a run's learned tokens",
        description='Sample images of prompts that use a run\'s tokens, e.g. "a photo of <c1> on a beach". '
        'Shorthands: "all" = every concept together, "<c2>" = "a photo of <c2>".',
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder (with manifest.json)")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help='prompt, "all", or a bare token such as "<c2>"')
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/generated)")
    n_field = next(f for f in fields(GenerateConfig) if f.name == "n")
    p.add_argument(
        "-n", "--n", dest="GenerateConfig.n", type=int, default=None, metavar="N",
        help=f"{n_field.metadata['help']} (default: {n_field.default})",
    )
    add_config_args(p, GenerateConfig, skip=("n",))
    add_run_model_args(p, "the run's, from manifest.json")
    p.set_defaults(func=_cmd_generate)
    return p


def _cmd_generate(args: argparse.Namespace) -> int:
    from .cli import config_from_args
    from .export import read_manifest

    # Flags first, then the run: both fail in a second, before the model loads.
    gen_cfg = config_from_args(args, GenerateConfig)
    manifest = read_manifest(args.run_dir)
    model_cfg = config_from_args(args, ModelConfig, **_manifest_model(manifest))
    root = generate_from_run(args.run_dir, args.prompts, gen_cfg, out_dir=args.out, model_options=asdict(model_cfg))
    tokens = [e["token"] for e in manifest["tokens"]]
    expanded = list(dict.fromkeys(expand_prompt(p, tokens) for p in args.prompts))
    for prompt, folder in zip(expanded, prompt_folders(root, expanded)):
        print(f"{prompt!r}: {gen_cfg.n} images + grid.png -> {folder}/")
    return 0
