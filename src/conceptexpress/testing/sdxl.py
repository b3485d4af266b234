"""Random-weight SDXL pipelines: a tiny one for CPU tests and the full-size architecture for shape checks.

Same rules as the SD 1.x / 2.x helpers of :mod:`conceptexpress.testing`: configs are written in code, the CLIP
tokenizers are generated (byte-level, no merges), and saved folders are ordinary diffusers pipelines that load
through :func:`conceptexpress.models.load_pipeline`.

Tiny SDXL (``save_tiny_sdxl_pipeline``), chosen so that mixed-up sizes fail loudly:

=============  ===================================================================================
UNet           3 levels like SDXL: DownBlock2D (no attention), CrossAttnDownBlock2D ×2;
               transformer_layers_per_block (1, 1, 2); ``text_time`` added conditioning; sample_size 16
text_encoder   ``CLIPTextModel``, width 32 (SDXL: CLIP ViT-L, 768); tokenizer pads with end-of-text
text_encoder_2 ``CLIPTextModelWithProjection``, width 48, projection 40 (SDXL: bigG, 1280 / 1280);
               tokenizer pads with ``!``; config ``eos_token_id=2`` — the legacy value of the real SDXL
               config, with which transformers pools at ``argmax(input_ids)``
context        32 + 48 = 80 (SDXL: 2048); added embedding input 40 + 6 × 8 = 88 (SDXL: 1280 + 6 × 256)
VAE            factor 8, ``force_upcast=True``, scaling 0.13025 (SDXL's)
scheduler      ``EulerDiscreteScheduler`` with SDXL base's config
=============  ===================================================================================

Full size (:func:`sdxl_unet`, :func:`sdxl_random_pipeline`): the published SDXL base configs (DESIGN §9), built on
the meta device by default (no memory, no time), or on the CPU with random weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..models.loading import frozen_pipeline
from ..models.tokenizer_files import write_clip_tokenizer
from .ldm_format import sdxl_pipeline_to_ldm

SDXL_SCALING_FACTOR = 0.13025
# Widths of the tiny encoders (different on purpose) and the pooled projection of encoder 2.
TINY_WIDTHS = (32, 48)
TINY_PROJECTION = 40
TINY_TIME_EMBED = 8


def sdxl_scheduler() -> EulerDiscreteScheduler:
    """The scheduler of SDXL base 1.0 (its ``scheduler/scheduler_config.json``)."""
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        use_karras_sigmas=False,
        timestep_spacing="leading",
        steps_offset=1,
    )


def tiny_sdxl_unet_config(
    widths: tuple[int, int] = TINY_WIDTHS, projection_dim: int = TINY_PROJECTION
) -> dict:
    """UNet with SDXL's block layout at toy width: no attention at the latent's own resolution, self- and
    cross-attention at latent/2 (1 transformer layer) and latent/4 (2 layers, also the mid block)."""
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 4),  # diffusers' name for the number of heads
        cross_attention_dim=sum(widths),
        addition_embed_type="text_time",
        addition_time_embed_dim=TINY_TIME_EMBED,
        projection_class_embeddings_input_dim=projection_dim + 6 * TINY_TIME_EMBED,
        use_linear_projection=True,
        norm_num_groups=8,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def sdxl_unet_config() -> dict:
    """UNet2DConditionModel config of SDXL base 1.0 (its published ``unet/config.json``; 2.57 B parameters)."""
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),  # heads; head size 64
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 time ids × 256
        use_linear_projection=True,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def sdxl_text_encoder_configs(vocab_size: int = 49408, bos: int = 49406, eos: int = 49407
                              ) -> tuple[CLIPTextConfig, CLIPTextConfig]:
    """Configs of SDXL's CLIP ViT-L (768, 12 layers, 12 heads) and OpenCLIP bigG (1280, 32 layers, 20 heads,
    intermediate 5120, projection 1280). Encoder 2 keeps the real config's legacy ``eos_token_id=2``."""
    clip_l = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
        num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu",
        bos_token_id=bos, eos_token_id=eos, pad_token_id=1,
    )  # fmt: skip
    clip_g = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
        num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu",
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )  # fmt: skip
    return clip_l, clip_g


def sdxl_vae_config(*, tiny: bool = False) -> dict:
    """AutoencoderKL config of SDXL's VAE (SD's layout, scaling 0.13025, ``force_upcast``: it overflows in fp16)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16) if tiny else (128, 256, 512, 512),
        layers_per_block=1 if tiny else 2,
        latent_channels=4,
        norm_num_groups=4 if tiny else 32,
        sample_size=128 if tiny else 1024,
        scaling_factor=SDXL_SCALING_FACTOR,
        force_upcast=True,
    )


def write_sdxl_tokenizers(path: str | Path) -> tuple[Path, Path]:
    """The two generated tokenizers of an SDXL pipeline under ``path``: ``tokenizer`` pads with the end-of-text
    token (CLIP ViT-L's), ``tokenizer_2`` with ``!`` (id 0, OpenCLIP bigG's)."""
    path = Path(path)
    return (write_clip_tokenizer(path / "tokenizer", pad_style="sd1"),
            write_clip_tokenizer(path / "tokenizer_2", pad_style="sd2"))  # fmt: skip


def _pipeline(unet, vae, text_encoder, text_encoder_2, tok_dirs: tuple[Path, Path]) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=CLIPTokenizer.from_pretrained(tok_dirs[0]),
        tokenizer_2=CLIPTokenizer.from_pretrained(tok_dirs[1]),
        unet=unet,
        scheduler=sdxl_scheduler(),
        add_watermarker=False,
    )


def tiny_sdxl_pipeline(tokenizer_dir: str | Path, *, seed: int = 0) -> StableDiffusionXLPipeline:
    """The tiny random SDXL pipeline (module docstring), in memory, fp32 on the CPU, as diffusers builds it
    (not frozen). Its tokenizers are written under ``tokenizer_dir``."""
    tok_dirs = write_sdxl_tokenizers(tokenizer_dir)
    vocab_size = len(json.loads((tok_dirs[0] / "vocab.json").read_text(encoding="utf-8")))
    bos, eos = vocab_size - 2, vocab_size - 1
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**tiny_sdxl_unet_config())
    vae = AutoencoderKL(**sdxl_vae_config(tiny=True))
    w1, w2 = TINY_WIDTHS
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=w1, intermediate_size=2 * w1, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=w1, hidden_act="quick_gelu",
            bos_token_id=bos, eos_token_id=eos, pad_token_id=1,
        )
    )  # fmt: skip
    text_encoder_2 = CLIPTextModelWithProjection(
        CLIPTextConfig(
            vocab_size=vocab_size, hidden_size=w2, intermediate_size=2 * w2, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY_PROJECTION, hidden_act="gelu",
            # The real SDXL text_encoder_2/config.json says bos 0, eos 2: with eos 2 transformers pools at
            # argmax(input_ids), which lands on an added token (the highest id) once one exists.
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )
    )  # fmt: skip
    return _pipeline(unet, vae, text_encoder, text_encoder_2, tok_dirs)


def save_tiny_sdxl_pipeline(path: str | Path, *, seed: int = 0) -> Path:
    """Write the tiny random SDXL pipeline (module docstring) to ``path`` with ``save_pretrained`` (safetensors,
    ~2 MB) and return the path. Native resolution 16 × 8 = 128 px; self-attention at 8² and 4²."""
    path = Path(path)
    src = path / "_tokenizer_src"
    tiny_sdxl_pipeline(src, seed=seed).save_pretrained(path, safe_serialization=True)
    shutil.rmtree(src, ignore_errors=True)
    return path


def save_tiny_sdxl_single_file(pipeline_dir: str | Path, out_file: str | Path) -> Path:
    """Write the SDXL pipeline folder ``pipeline_dir`` (e.g. from :func:`save_tiny_sdxl_pipeline`) as one
    original-layout ``.safetensors`` checkpoint, as A1111 / ComfyUI users have ``sd_xl_base_1.0.safetensors``:
    UNet ``model.diffusion_model.*`` (``label_emb`` for the added embedding), VAE ``first_stage_model.*``,
    ``conditioner.embedders.0.transformer.text_model.*`` (CLIP ViT-L, Hugging Face names) and
    ``conditioner.embedders.1.model.*`` (OpenCLIP bigG names, fused q/k/v, ``text_projection`` as OpenCLIP
    stores it: (width, projection)). Load it back with ``single_file_config=pipeline_dir``.
    """
    pipeline_dir, out_file = Path(pipeline_dir), Path(out_file)
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae")
    te1 = CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
    te2 = CLIPTextModelWithProjection.from_pretrained(pipeline_dir, subfolder="text_encoder_2")
    state = sdxl_pipeline_to_ldm(unet.state_dict(), vae.state_dict(), te1.state_dict(), te2.state_dict())
    out_file.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses views into shared storage; the reshaped VAE attention weights are views.
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(out_file),
              metadata={"format": "pt"})  # fmt: skip
    return out_file


# ---------------------------------------------------------------------------------------------- full size
def sdxl_unet(device: str | torch.device = "meta", dtype: torch.dtype = torch.float32) -> UNet2DConditionModel:
    """The full-size SDXL base UNet (:func:`sdxl_unet_config`, 2.57 B parameters) with random weights, built
    directly on ``device``: ``"meta"`` (default) holds no memory and takes ~1 s — shapes, parameter counts,
    FLOP counts and fake-tensor memory simulations; ``"cpu"`` draws real random weights (10 GB in fp32)."""
    with torch.device(device):
        unet = UNet2DConditionModel(**sdxl_unet_config())
    return _cast(unet, dtype)


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # nn.Module.to, not ModelMixin.to: the latter logs a warning about fp32 modules (there are none here).
    return torch.nn.Module.to(module, dtype)


def sdxl_random_pipeline(
    tokenizer_dir: str | Path, *, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> StableDiffusionXLPipeline:
    """The full-size SDXL base architecture with random weights (UNet 2.57 B, CLIP ViT-L, OpenCLIP bigG, VAE),
    built on ``device`` (``"meta"``: no memory; ``"cpu"``: ~14 GB in fp32) in ``dtype``, and left as
    :func:`~conceptexpress.models.load_pipeline` leaves a loaded one: frozen, in eval mode, progress bars off
    (VAE upcasting is the loader's business and is not applied here).

    The generated tokenizers (514 ids; the encoders keep SDXL's vocabulary of 49,408) are written under
    ``tokenizer_dir``; prompts tokenize differently from the real model but every shape is the real one.
    """
    tok_dirs = write_sdxl_tokenizers(tokenizer_dir)
    torch.manual_seed(seed)
    # ids of the generated tokenizer's special tokens (its vocabulary is smaller than 49408)
    cfg_l, cfg_g = sdxl_text_encoder_configs(bos=512, eos=513)
    with torch.device(device):
        unet = UNet2DConditionModel(**sdxl_unet_config())
        vae = AutoencoderKL(**sdxl_vae_config())
        text_encoder = CLIPTextModel(cfg_l)
        text_encoder_2 = CLIPTextModelWithProjection(cfg_g)
    modules = [_cast(m, dtype) for m in (unet, vae, text_encoder, text_encoder_2)]
    return frozen_pipeline(_pipeline(*modules, tok_dirs), device)
