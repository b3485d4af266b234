"""Generate images with the learned tokens of a run (``conceptexpress generate RUN "a photo of <c1>"``).

The sampler and guidance are the model family's unless given (``GenerateConfig.for_family``): for SD 1.x/2.x the
released code's (:mod:`conceptexpress.sampler`: DDIM, guidance 7.5), for SDXL its own (Euler, guidance 5.0); 50 steps,
the model's native size, seeds 0…n−1, and ``generation.json`` records what was used. Each image ``i`` of a prompt
starts from noise drawn by its own CPU ``torch.Generator`` seeded with ``seed + i``: the pictures do not depend on
batch size, device or the other prompts, and image ``i`` of two prompts starts from the same noise, so prompts
compare side by side. SDXL's prompt embeddings are computed here (:func:`text_embeddings`) so that the pooled
embedding is read at the end of the text, not on a learned token.
Outputs::

    RUN/generated/<slug-of-prompt>/000.png 001.png …   one file per image
    RUN/generated/<slug-of-prompt>/grid.png            all images of the prompt
    RUN/generated/<slug-of-prompt>/generation.json     prompt, seeds, sampler, config, model — written last
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import __version__
from .config import GenerateConfig, ModelConfig
from .embeddings import run_tokens
from .errors import ConfigError, InputError
from .io.atomic import atomic_save_image, atomic_write_json, ensure_output_dir
from .io.checked import resolve_inside
from .io.manifest import RunManifest
from .io.run_folder import RunFolder, read_manifest
from .models import load_pipeline
from .models.family import family_of
from .sampler import build_scheduler, describe, using_scheduler

__all__ = [
    "GenerateConfig", "expand_prompt", "generate", "generate_from_run", "image_grid", "prompt_folders",
    "prompt_slug", "run_model_config", "sampler_record", "text_embeddings",
]

RECORD = "generation.json"
# Angle-bracketed words are placeholders by convention (<c1>, <cat-toy>); one the run lacks is a typo.
_TOKEN_LIKE = re.compile(r"<[A-Za-z0-9_.\-]+>")
_SLUG_MAX = 60
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


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
    call only: the pipeline is handed back with its own scheduler. A family with a pooled text embedding (SDXL)
    gets its prompt embeddings from :func:`text_embeddings` (pooled at the end-of-text position, never on a
    learned token); SD 1.x / 2.x pipelines encode the prompt themselves, as before.

    Returns:
        One list of ``n`` RGB PIL images per prompt, in order, each ``width × height`` (model native by default).
    """
    if isinstance(prompts, str) or not prompts:
        raise ConfigError(f"`prompts` must be a non-empty list of strings, got {prompts!r}")
    family = family_of(pipe)
    config = (config or GenerateConfig()).for_family(family)  # unset sampler and guidance: the family's
    results = []
    with using_scheduler(pipe, config.scheduler):
        for prompt in prompts:
            # CPU generators: the same noise on cuda, mps and cpu (diffusers draws on CPU and moves it).
            generators = [torch.Generator("cpu").manual_seed(config.seed + i) for i in range(config.n)]
            if any(spec.pooled for spec in family.encoders):
                text = text_embeddings(pipe, prompt, config.negative_prompt, guidance=config.guidance,
                                       size=(config.height, config.width))
            else:
                text = {"prompt": prompt, "negative_prompt": config.negative_prompt or None}
            out = pipe(
                **text,
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


@torch.no_grad()
def text_embeddings(
    pipe, prompt: str, negative_prompt: str = "", *, guidance: float = 7.5,
    size: tuple[int | None, int | None] = (None, None),
) -> dict[str, torch.Tensor]:
    """The text keyword arguments of a pipeline call for ``prompt``, computed with the pipeline's family.

    diffusers' SDXL ``encode_prompt`` takes the pooled embedding from ``CLIPTextModelWithProjection``, which pools
    at ``argmax(input_ids)`` for configs with the legacy ``eos_token_id`` 2 (SDXL's): once a token is loaded that is
    the token's position (its id is the highest), not the end of the text. Here the context and the pooled
    embedding come from :meth:`ModelFamily.encode` (pooled at the end-of-text position), for the prompt and, with
    guidance > 1, the negative prompt — zeros for an empty negative prompt when the pipeline's config says
    ``force_zeros_for_empty_prompt``, as diffusers does. The time ids are left to the pipeline, which builds them
    from the requested size exactly as without these arguments.

    Args:
        pipe: a loaded pipeline with its tokens (multi-vector tokens are expanded as diffusers does).
        prompt, negative_prompt: the texts ("" = no negative prompt).
        guidance: the call's guidance scale (negatives are only computed above 1).
        size: the call's (height, width) in pixels, None = the model's native size.

    Returns:
        ``{"prompt_embeds": (1, L, ΣD), "pooled_prompt_embeds": (1, P)}`` and, with guidance > 1, the two
        ``negative_…`` tensors of the same shapes; in the UNet's dtype on the text encoders' device.
    """
    family = family_of(pipe)
    native = family.native_resolution(pipe)
    hw = (size[0] or native, size[1] or native)
    time_ids = family.micro_conditioning(hw, hw)

    def encode(text: str):
        if hasattr(pipe, "maybe_convert_prompt"):  # "<m1>" -> "<m1> <m1>_1" for a multi-vector token
            text = pipe.maybe_convert_prompt(text, family.tokenizers(pipe)[0])
        return family.encode(pipe, family.tokenize(pipe, [text]), time_ids=time_ids)

    cond = encode(prompt)
    out = {"prompt_embeds": cond.context, "pooled_prompt_embeds": cond.pooled}
    if guidance > 1:
        if not negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
            neg_context, neg_pooled = torch.zeros_like(cond.context), torch.zeros_like(cond.pooled)
        else:
            neg = encode(negative_prompt)
            neg_context, neg_pooled = neg.context, neg.pooled
        out.update(negative_prompt_embeds=neg_context, negative_pooled_prompt_embeds=neg_pooled)
    return out


def sampler_record(pipe, config: GenerateConfig) -> dict[str, Any]:
    """What a run records about how its pictures were sampled (:func:`conceptexpress.sampler.describe`)."""
    config = config.for_family(family_of(pipe))
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
        pipe: an already loaded pipeline of the run's base model; used as is (not reloaded). The run's tokens
            are added for the call and removed again: the pipeline is handed back as it was found.
        out_dir: where the per-prompt folders go (default ``RUN/generated``).
        model_options: :class:`~conceptexpress.config.ModelConfig` fields (``device``, ``dtype``, ``model``,
            ``single_file_config``) overriding the manifest's base model; ignored when ``pipe`` is given.

    Returns:
        The output root; prompt ``p`` is in ``prompt_folders(root, [expand_prompt(p, tokens)])[0]``.

    Raises:
        InputError: the run is missing, incomplete or damaged. ConfigError: a bad option or a prompt naming
        a token the run lacks. ModelLoadError / OutputError: the model or the output folder.
    """
    config = config or GenerateConfig()
    if isinstance(prompts, str) or not prompts:
        raise ConfigError(f"`prompts` must be a non-empty list of strings, got {prompts!r}")
    # 1. Cheap checks first: a bad run, prompt or output folder fails before the model loads.
    run = Path(run_dir)
    manifest = read_manifest(run)
    tokens = manifest.token_list
    expanded = list(dict.fromkeys(expand_prompt(p, tokens) for p in prompts))  # duplicates would redo work
    root = ensure_output_dir(out_dir if out_dir is not None else run / RunFolder.GENERATED_DIR)
    model_cfg = run_model_config(manifest, model_options, run)

    # 2. Model and tokens.
    model_name = manifest.base_model  # what a passed pipeline is assumed to be
    if pipe is None:
        pipe = load_pipeline(model_cfg)
        model_name = model_cfg.model

    # 3. Sample and write, one prompt at a time so a long job keeps what it finished.
    with run_tokens(pipe, run):
        _sample_and_write(pipe, run, expanded, root, config, model_name)
    return root


def _sample_and_write(pipe, run: Path, expanded: list[str], root: Path, config: GenerateConfig, model_name) -> None:
    config = config.for_family(family_of(pipe))  # generation.json records the sampler and guidance used
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


def run_model_config(
    manifest: RunManifest, options: Mapping[str, Any] | None = None, run_dir: str | Path | None = None
) -> ModelConfig:
    """The run's base model (``base_model`` / ``single_file_config`` of its manifest) with ``options``
    (:class:`~conceptexpress.config.ModelConfig` fields, None = unset) overriding it.

    A ``--method bas-ft`` run (manifest ``"fine_tune"``) records its own fine-tuned pipeline as ``base_model``,
    relative to the run folder: it is resolved against ``run_dir``, which such a run needs (unless ``options``
    names another model).

    Raises:
        ConfigError: ``options`` has a key that is not a ModelConfig field, or a bad value; a bas-ft run without
            ``run_dir``. InputError: a bas-ft run whose pipeline folder is missing (RunFolderError: or named
            outside the run folder).
    """
    allowed = [f.name for f in fields(ModelConfig)]
    unknown = sorted(set(options or {}) - set(allowed))
    if unknown:
        raise ConfigError(f"`model_options` has unknown keys {unknown}; allowed: {allowed}")
    given = {k: v for k, v in (options or {}).items() if v is not None}
    recorded = {"model": manifest.base_model, "single_file_config": manifest.single_file_config}
    if manifest.get("fine_tune") and manifest.base_model and "model" not in given:
        if run_dir is None:
            raise ConfigError("this run fine-tuned its own model (bas-ft): pass `run_dir` to find its pipeline folder")
        # relative to the run folder and never outside it (a tampered manifest must not load another model)
        folder = resolve_inside(run_dir, manifest.base_model, source=Path(run_dir) / RunFolder.MANIFEST)
        if not folder.is_dir():
            raise InputError(f"the run's fine-tuned pipeline {str(folder)!r} is missing; the run folder is damaged")
        recorded = {"model": str(folder.resolve()), "single_file_config": None}
    return ModelConfig(**{**{k: v for k, v in recorded.items() if v is not None}, **given})
