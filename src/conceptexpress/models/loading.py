"""Load a Stable Diffusion 1.x / 2.x or SDXL base pipeline from a hub id, a local diffusers folder or a single file.

The pipeline class is decided from what the model *is*, before any weight is read (DESIGN §9):

* a diffusers folder: its ``model_index.json`` (``_class_name`` and components) and the UNet / text-encoder /
  tokenizer configs, through :func:`~conceptexpress.models.family.family_from_configs`;
* a hub id: the same files, fetched first on their own (configs only, a few kB; from the local Hugging Face cache
  first, from the network unless ``HF_HUB_OFFLINE`` is set);
* a single ``.safetensors`` file: its key layout (:mod:`conceptexpress.models.single_file`).

An SDXL folder loads as ``StableDiffusionXLPipeline`` with both text encoders and tokenizers; SD 1.x / 2.x as
``StableDiffusionPipeline``. Anything else (an SDXL refiner, an inpainting model, a DiT pipeline) is refused
before any weight loads with one line naming the supported families
(:class:`~conceptexpress.models.family.UnsupportedModelError`), and so is a diffusers folder whose weights are
pickles only. After loading, :func:`~conceptexpress.models.family.family_of` must agree with the decision.
All routes end in the same state (safety checker / watermarker off, weights frozen, eval mode, on the chosen
device and dtype), so everything downstream — and every test on the tiny random pipelines of
:mod:`conceptexpress.testing` — goes through the code users hit.

SDXL's VAE overflows in fp16 (its config says ``force_upcast``): in an fp16 SDXL pipeline the VAE is kept in
fp32 (:func:`keep_vae_fp32`), with its inputs cast to fp32 on the way in, so that encoding a photo, diffusers'
own decoding at the end of sampling, and any other path through the VAE never see fp16 overflow (NaN images).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import huggingface_hub
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import deprecation_utils
from huggingface_hub.errors import LocalEntryNotFoundError

from ..config import DEFAULT_MODEL, ModelConfig
from ..errors import ModelLoadError
from .family import SDXL, ModelFamily, UnsupportedModelError, family_from_configs, family_of, get_family
from .single_file import inspect_single_file, load_single_file, pipeline_class, pipeline_kwargs

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALTERNATIVES = (
    f"pass a hub id (default {DEFAULT_MODEL!r}), a local diffusers folder (with model_index.json), "
    "or a single-file .safetensors checkpoint"
)
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}
# What a pipeline's family is decided from: configs and tokenizer files only, never weights.
_CONFIG_PATTERNS = ["*.json", "**/*.json", "*.txt", "**/*.txt", "*.model", "**/*.model"]


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → cuda if available, else mps, else cpu. An unavailable explicit device is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind = name.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available here; use --device cpu")
    if kind == "cuda" and ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
        raise ModelLoadError(
            f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"(cuda:0 … cuda:{torch.cuda.device_count() - 1})"
        )
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError(f"device {name!r} requested but MPS is not available here; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` → bf16 on CUDA GPUs that support it, else fp16 on cuda/mps; fp32 on cpu (half precision is slow and
    lossy on CPU).

    bf16 where token learning's ``mixed_precision="auto"`` autocasts to bf16: autocast keeps a bf16 copy of every
    fp16 weight it uses, +2 GB for SD 2.1 (8.3 instead of 6.2 GB at 512 px, micro-batch 4) and +6 GB for SDXL
    (docs/scaling.md).
    """
    if name == "auto":
        if device.type == "cpu":
            return torch.float32
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16
    return _DTYPES[name]


def load_pipeline(config: ModelConfig | str | os.PathLike | None = None, **overrides) -> DiffusionPipeline:
    """Load the base model described by ``config`` (or a model string or path plus ``ModelConfig`` overrides).

    Returns a ``StableDiffusionPipeline`` (SD 1.x / 2.x) or ``StableDiffusionXLPipeline`` (SDXL base) in eval
    mode with every parameter frozen, moved to the resolved device and dtype (an fp16 SDXL pipeline keeps its
    VAE in fp32, module docstring); ``family_of(pipe)`` names its family. Raises :class:`ModelLoadError` with
    a one-line message naming what was tried and the alternatives when the model cannot be found or loaded,
    and its subclass :class:`UnsupportedModelError` (naming the supported families) for a model of another
    kind — both before any weight is read where the configs or the file header tell.
    """
    if config is None:
        config = ModelConfig(**overrides)
    elif isinstance(config, (str, os.PathLike)):
        config = ModelConfig(model=config, **overrides)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    pipe, expected = _load(config, dtype)
    family = family_of(pipe)
    if family.pipeline != expected.pipeline or (expected.exact and family is not expected.family):
        raise ModelLoadError(
            f"model {config.model!r} was read as {expected.family.label} from its configs but loaded as "
            f"{family.label} ({type(pipe).__name__}); pass a consistent diffusers folder"
        )
    if family is SDXL and dtype == torch.float16 and getattr(pipe.vae.config, "force_upcast", False):
        keep_vae_fp32(pipe.vae)
    pipe = frozen_pipeline(pipe, device)
    logger.info("loaded %s (%s) on %s (%s)", config.model, family.label, device, str(dtype).removeprefix("torch."))
    return pipe


def frozen_pipeline(pipe: DiffusionPipeline, device: torch.device | str) -> DiffusionPipeline:
    """The state :func:`load_pipeline` returns a pipeline in: every parameter frozen (UNet, VAE and each text
    encoder of its family), eval mode, progress bars off, on ``device``."""
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, *family_of(pipe).text_encoders(pipe)):
        module.requires_grad_(False)
        module.eval()
    return pipe.to(device)


def keep_vae_fp32(vae: torch.nn.Module) -> torch.nn.Module:
    """Put ``vae`` (an ``AutoencoderKL``) in fp32 and cast every input of its encoder and decoder to the VAE's
    dtype, so that callers holding fp16 tensors — diffusers' SDXL pipeline decoding fp16 latents, a trainer
    encoding a photo — go through the VAE in fp32 (SDXL's VAE overflows to inf/NaN in fp16). Outputs stay
    fp32. Idempotent; returns ``vae``."""
    vae.to(torch.float32)
    if not getattr(vae, "_conceptexpress_fp32_inputs", False):

        def cast(module, args):
            dtype = next(module.parameters()).dtype
            return tuple(a.to(dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

        # encode: encoder(x) then quant_conv; decode: post_quant_conv(z) then decoder(z) (either may be off).
        for name in ("encoder", "quant_conv", "post_quant_conv", "decoder"):
            module = getattr(vae, name, None)
            if isinstance(module, torch.nn.Module) and any(True for _ in module.parameters()):
                module.register_forward_pre_hook(cast)
        vae._conceptexpress_fp32_inputs = True
    return vae


class _Expected:
    """The family decided before loading; ``exact`` when the source tells SD 1.x from SD 2.x as
    :func:`family_of` does (folders and hub ids), not only the pipeline class (single files at odd widths)."""

    def __init__(self, family: ModelFamily, exact: bool):
        self.family, self.exact = family, exact

    @property
    def pipeline(self) -> str:
        return self.family.pipeline


def _load(config: ModelConfig, dtype: torch.dtype) -> tuple[DiffusionPipeline, _Expected]:
    source = config.model
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise ModelLoadError(
                f"model file {str(path)!r} is a pickle checkpoint ({path.suffix}); pickles can run code and are "
                "never loaded: convert it to .safetensors, or " + _ALTERNATIVES
            )
        if path.suffix.lower() != ".safetensors":
            raise ModelLoadError(f"model file {str(path)!r} is not a .safetensors checkpoint; {_ALTERNATIVES}")
        pipe = load_single_file(path, torch_dtype=dtype, config=config.single_file_config)
        return pipe, _Expected(get_family(inspect_single_file(path).family), exact=False)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"folder {str(path)!r} is not a diffusers pipeline (no model_index.json); {_ALTERNATIVES}"
            )
        what = f"folder {str(path)!r}"
        family = _family_of_folder(path, what)
        _refuse_pickled_weights(path, what)
        return _from_pretrained(family, str(path), dtype, what=what), _Expected(family, exact=True)
    if _looks_like_path(source):
        raise ModelLoadError(f"model {source!r}: no such file or folder; {_ALTERNATIVES}")
    what = f"hub id {source!r}"
    family = _family_of_folder(_hub_configs(source, what), what)
    return _from_pretrained(family, source, dtype, what=what), _Expected(family, exact=True)


def _read_json(path: Path, what: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{what}: {path.name} is not valid JSON ({_first_line(exc)}); {_ALTERNATIVES}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what}: {path.name} is not a JSON object; {_ALTERNATIVES}")
    return data


def _family_of_folder(folder: Path, what: str) -> ModelFamily:
    """The family of the diffusers pipeline in ``folder`` from its configs alone (no weights read)."""
    model_index = _read_json(folder / "model_index.json", what) or {}
    try:
        return family_from_configs(
            model_index,
            _read_json(folder / "unet" / "config.json", what),
            _read_json(folder / "text_encoder" / "config.json", what),
            _read_json(folder / "tokenizer" / "tokenizer_config.json", what),
        )
    except UnsupportedModelError as exc:
        raise UnsupportedModelError(f"{what}: {exc}") from None


def _refuse_pickled_weights(folder: Path, what: str) -> None:
    """Refuse a diffusers folder whose components hold pickled weights only (``*.bin``, no ``*.safetensors``)
    before diffusers sees it: diffusers would unpickle them (pickles can run code), and it logs before failing."""
    pickled = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = [f for f in sub.iterdir() if f.is_file()]
        if any(f.suffix == ".safetensors" for f in files):
            continue
        pickled += [f"{sub.name}/{f.name}" for f in files if f.suffix.lower() in _PICKLE_SUFFIXES]
    if pickled:
        shown = ", ".join(pickled[:3]) + (f" (+{len(pickled) - 3} more)" if len(pickled) > 3 else "")
        raise ModelLoadError(
            f"{what} holds pickled weights only ({shown}); pickles can run code and are never loaded: convert them "
            f"to .safetensors (DiffusionPipeline.from_pretrained(...).save_pretrained(dir, safe_serialization=True) "
            f"on a machine you trust), or {_ALTERNATIVES}"
        )


def _offline() -> bool:
    # Read at call time: huggingface_hub reads HF_HUB_OFFLINE once at import.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_configs(repo_id: str, what: str) -> Path:
    """A local folder with the configs and tokenizer files of hub repository ``repo_id`` (no weights): the
    Hugging Face cache first, then the network unless ``HF_HUB_OFFLINE`` is set."""
    snapshot_download = huggingface_hub.snapshot_download  # looked up per call (tests replace it)
    try:
        cached = Path(snapshot_download(repo_id, allow_patterns=_CONFIG_PATTERNS, local_files_only=True))
        if (cached / "model_index.json").is_file():
            return cached
        where = "lacks model_index.json in"
    except LocalEntryNotFoundError:
        where = "is not in"
    except Exception as exc:  # a malformed id, an unreadable cache
        raise ModelLoadError(f"could not load {what}: {_first_line(exc)}; {_ALTERNATIVES}") from exc
    if _offline():
        raise ModelLoadError(
            f"could not load {what}: it {where} the local Hugging Face cache and HF_HUB_OFFLINE is set; {_ALTERNATIVES}"
        )
    try:
        fetched = Path(snapshot_download(repo_id, allow_patterns=_CONFIG_PATTERNS))
    except Exception as exc:  # no network, repository deleted or gated, ...
        raise ModelLoadError(f"could not load {what}: {_first_line(exc)}; {_ALTERNATIVES}") from exc
    if not (fetched / "model_index.json").is_file():
        raise ModelLoadError(f"could not load {what}: it has no model_index.json (not a diffusers pipeline); {_ALTERNATIVES}")
    return fetched


def _looks_like_path(source: str) -> bool:
    # A hub id is "name" or "org/name"; anything else that does not exist was meant as a path.
    return (
        source.startswith((".", "/", "~", "\\"))
        or source.count("/") > 1
        or Path(source).suffix.lower() in _PICKLE_SUFFIXES | {".safetensors"}
    )


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``{"dtype": …}`` on diffusers that renamed ``torch_dtype`` (0.36+), ``{"torch_dtype": …}`` before."""
    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def _from_pretrained(family: ModelFamily, source: str, dtype: torch.dtype, what: str) -> DiffusionPipeline:
    try:
        return pipeline_class(family).from_pretrained(source, **pipeline_kwargs(family), **dtype_kwargs(dtype))
    except Exception as exc:  # hub, network, config and weight errors all end here
        raise ModelLoadError(f"could not load {what}: {_first_line(exc)}; {_ALTERNATIVES}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
