"""Random-weight Stable Diffusion pipelines built from configs, for tests and offline smoke checks.

Nothing here downloads: configs are written in code and the CLIP tokenizer files are generated on the fly
(a byte-level vocabulary with no merges, so every word is spelled out in characters). The saved folders are
ordinary diffusers pipelines and load through :func:`conceptexpress.models.load_pipeline`, the same code path
users hit with real weights.

    >>> from conceptexpress.testing import save_tiny_pipeline
    >>> path = save_tiny_pipeline("/tmp/tiny-sd")        # seconds, ~1 MB
    >>> path = save_tiny_sdxl_pipeline("/tmp/tiny-sdxl")  # SDXL: two text encoders (see .sdxl)

SDXL helpers (tiny pipeline, its single-file form, the full-size architecture on the meta device) live in
:mod:`conceptexpress.testing.sdxl` and are re-exported here.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..models.loading import frozen_pipeline
from ..models.tokenizer_files import PAD_STYLES, _bytes_to_unicode, write_clip_tokenizer  # noqa: F401  (re-exported)
from .ldm_format import pipeline_to_ldm
from .sdxl import (
    save_tiny_sdxl_pipeline,
    save_tiny_sdxl_single_file,
    sdxl_random_pipeline,
    sdxl_unet,
    sdxl_unet_config,
    tiny_sdxl_pipeline,
    tiny_sdxl_unet_config,
)

__all__ = [
    "PAD_STYLES",
    "save_sd21_random_pipeline",
    "save_tiny_pipeline",
    "save_tiny_sdxl_pipeline",
    "save_tiny_sdxl_single_file",
    "save_tiny_single_file",
    "sd21_random_pipeline",
    "sd21_unet_config",
    "sdxl_random_pipeline",
    "sdxl_unet",
    "sdxl_unet_config",
    "tiny_sdxl_pipeline",
    "tiny_sdxl_unet_config",
    "tiny_unet_config",
    "write_clip_tokenizer",
]


def _scheduler():
    # SD 2.1-base ships a PNDM scheduler with the training schedule of SD 2.1-base (scaled_linear betas 0.00085–0.012, 1000 steps).
    return PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _pipeline(unet, vae, text_encoder, tokenizer_dir: Path) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=unet,
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _save(path: Path, unet, vae, text_encoder, tokenizer_dir: Path, safe_serialization: bool = True) -> Path:
    _pipeline(unet, vae, text_encoder, tokenizer_dir).save_pretrained(path, safe_serialization=safe_serialization)
    return path


def tiny_unet_config(cross_attention_dim: int = 32) -> dict:
    """UNet with SD 2.1's block layout at toy width: attention at latent, latent/2 and latent/4, plain latent/8."""
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 2, 4, 4),
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        norm_num_groups=8,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def save_tiny_pipeline(path: str | Path, *, pad_style: str = "sd2", seed: int = 0) -> Path:
    """Write a tiny random SD pipeline to ``path`` and return the path.

    UNet: four levels like SD 2.1 (self- and cross-attention at latent, latent/2, latent/4; mid block at
    latent/8), sample_size 16. VAE: factor 8 (4 blocks). Native resolution: 16 × 8 = 128 px. CLIP text encoder:
    2 layers, hidden 32. Tokenizer: written on the fly, padding per ``pad_style`` (``"sd2"`` or ``"sd1"``).
    """
    path = Path(path)
    tok_dir = write_clip_tokenizer(path / "_tokenizer_src", pad_style=pad_style)
    vocab_size = len(json.loads((tok_dir / "vocab.json").read_text(encoding="utf-8")))
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_unet_config())
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=128,
        scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=32,
            hidden_act="gelu",
            bos_token_id=vocab_size - 2,
            eos_token_id=vocab_size - 1,
            pad_token_id=1,
        )
    )
    out = _save(path, unet, vae, text_encoder, tok_dir)
    _rmtree(tok_dir)
    return out


def sd21_unet_config() -> dict:
    """UNet2DConditionModel config of SD 2.1-base (its published unet/config.json; 865.9 M parameters)."""
    return dict(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(5, 10, 20, 20),
        cross_attention_dim=1024,
        use_linear_projection=True,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def save_sd21_random_pipeline(path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float16) -> Path:
    """Write the full-size SD 2.1-base architecture with random weights (shape-level smoke tests).

    Weights are stored in ``dtype`` (fp16 by default: 2.6 GB instead of 5.2 GB on disk); load them back in
    any dtype. The tokenizer is the generated byte-level one (SD 2.x padding), so prompts tokenize
    differently from the real model, but every shape is the real one: UNet 865.9 M parameters, 16 self- and
    16 cross-attention layers, CLIP text encoder with 23 layers of width 1024, VAE factor 8.
    """
    path = Path(path)
    tok_dir = write_clip_tokenizer(path / "_tokenizer_src", pad_style="sd2")
    out = _save(path, *_sd21_modules(seed, dtype), tok_dir)
    _rmtree(tok_dir)
    return out


def sd21_random_pipeline(tokenizer_dir: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32
                         ) -> StableDiffusionPipeline:
    """The pipeline :func:`save_sd21_random_pipeline` writes (same modules, same seed), built in memory in
    ``dtype`` on the CPU — no 2.6 GB round trip through the disk (~25 s less) — and left as
    :func:`~conceptexpress.models.load_pipeline` leaves a loaded one: frozen, in eval mode, progress bars off.
    The generated tokenizer is written to ``tokenizer_dir``."""
    tok_dir = write_clip_tokenizer(Path(tokenizer_dir), pad_style="sd2")
    return frozen_pipeline(_pipeline(*_sd21_modules(seed, dtype), tok_dir), "cpu")


def _sd21_modules(seed: int, dtype: torch.dtype) -> tuple:
    """UNet, VAE and text encoder of SD 2.1-base with random weights drawn from ``seed``."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**sd21_unet_config()).to(dtype)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
        scaling_factor=0.18215,
    ).to(dtype)
    vocab_size = 49408
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            max_position_embeddings=77,
            projection_dim=512,
            hidden_act="gelu",
            # ids of the generated tokenizer's special tokens (its vocabulary is smaller than 49408)
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=1,
        )
    ).to(dtype)
    return unet, vae, text_encoder


def _rmtree(p: Path) -> None:
    shutil.rmtree(p, ignore_errors=True)


def save_tiny_single_file(
    pipeline_dir: str | Path, out_file: str | Path, *, text_encoder_layout: str = "clip"
) -> Path:
    """Write the pipeline folder ``pipeline_dir`` (e.g. from :func:`save_tiny_pipeline`) as one original-layout
    ``.safetensors`` checkpoint, like the ``v1-5-pruned-emaonly`` / ``v2-1_512-ema-pruned`` files users download.

    UNet under ``model.diffusion_model.*``, VAE under ``first_stage_model.*``, text encoder under
    ``cond_stage_model.transformer.text_model.*`` (``text_encoder_layout="clip"``, SD 1.x style) or
    ``cond_stage_model.model.*`` (``"open_clip"``, SD 2.x style); see :mod:`conceptexpress.testing.ldm_format`.
    Tokenizer and scheduler are not part of such files: load it back with ``config=pipeline_dir``.
    """
    pipeline_dir, out_file = Path(pipeline_dir), Path(out_file)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    state = pipeline_to_ldm(
        unet.state_dict(),
        vae.state_dict(),
        text_encoder.state_dict(),
        text_encoder_layout=text_encoder_layout,
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses views into shared storage; the reshaped VAE attention weights are views.
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    save_file(tensors, str(out_file), metadata={"format": "pt"})
    return out_file


_KINDS = {
    "tiny": lambda path: save_tiny_pipeline(path),
    "tiny-sd1": lambda path: save_tiny_pipeline(path, pad_style="sd1"),
    "tiny-sdxl": lambda path: save_tiny_sdxl_pipeline(path),
    "sd21": lambda path: save_sd21_random_pipeline(path),
}


def _main(argv: list[str] | None = None) -> int:
    """``python -m conceptexpress.testing {tiny,tiny-sd1,tiny-sdxl,sd21} DIR``: write a random pipeline for
    offline trials. tiny / tiny-sd1: ~7 MB (SD 2.x / SD 1.x padding); tiny-sdxl: ~13 MB (two text encoders);
    sd21: the full SD 2.1-base shape (2.5 GB). (No argparse: the shell is ``conceptexpress.cli``.)
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 2 or args[0] not in _KINDS:
        print(f"usage: python -m conceptexpress.testing {{{','.join(_KINDS)}}} DIR", file=sys.stderr)
        return 2
    kind, path = args[0], Path(args[1])
    out = _KINDS[kind](path)
    print(f"wrote a random {kind} pipeline to {out}")
    return 0

