"""Load a Stable Diffusion 1.x / 2.x pipeline from a hub id, a local diffusers folder or a single file.

All three routes end in the same ``StableDiffusionPipeline`` (safety checker off, weights frozen, on the
chosen device and dtype), so everything downstream (and every test on the tiny random pipelines of
:mod:`conceptexpress.testing`) goes through the code users hit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import deprecation_utils

from ..config import DEFAULT_MODEL, ModelConfig
from ..errors import ModelLoadError
from .single_file import load_single_file

logger = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALTERNATIVES = (
    f"pass a hub id (default {DEFAULT_MODEL!r}), a local diffusers folder (with model_index.json), "
    "or a single-file .safetensors checkpoint"
)
_PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin", ".pkl"}


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
    """``auto`` → fp16 on cuda/mps, fp32 on cpu (half precision is slow and lossy on CPU)."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.float16
    return _DTYPES[name]


def load_pipeline(config: ModelConfig | str | os.PathLike | None = None, **overrides) -> StableDiffusionPipeline:
    """Load the base model described by ``config`` (or a model string or path plus ``ModelConfig`` overrides).

    Returns a ``StableDiffusionPipeline`` in eval mode with every parameter frozen, moved to the resolved
    device and dtype. Raises :class:`ModelLoadError` with a one-line message naming what was tried and the
    alternatives when the model cannot be found or loaded.
    """
    if config is None:
        config = ModelConfig(**overrides)
    elif isinstance(config, (str, os.PathLike)):
        config = ModelConfig(model=config, **overrides)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    pipe = frozen_pipeline(_load(config, dtype), device)
    logger.info("loaded %s on %s (%s)", config.model, device, str(dtype).removeprefix("torch."))
    return pipe


def frozen_pipeline(pipe: StableDiffusionPipeline, device: torch.device | str) -> StableDiffusionPipeline:
    """The state :func:`load_pipeline` returns a pipeline in: every parameter frozen, eval mode, progress bars
    off, on ``device``."""
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
        module.eval()
    return pipe.to(device)


def _load(config: ModelConfig, dtype: torch.dtype) -> StableDiffusionPipeline:
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
        return load_single_file(path, torch_dtype=dtype, config=config.single_file_config)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelLoadError(
                f"folder {str(path)!r} is not a diffusers pipeline (no model_index.json); {_ALTERNATIVES}"
            )
        return _from_pretrained(StableDiffusionPipeline, str(path), dtype, what=f"folder {str(path)!r}")
    if _looks_like_path(source):
        raise ModelLoadError(f"model {source!r}: no such file or folder; {_ALTERNATIVES}")
    return _from_pretrained(StableDiffusionPipeline, source, dtype, what=f"hub id {source!r}")


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


def _from_pretrained(cls, source: str, dtype: torch.dtype, what: str):
    try:
        return cls.from_pretrained(
            source, safety_checker=None, feature_extractor=None, requires_safety_checker=False, **dtype_kwargs(dtype)
        )
    except Exception as exc:  # hub, network, config and weight errors all end here
        raise ModelLoadError(f"could not load {what}: {_first_line(exc)}; {_ALTERNATIVES}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
