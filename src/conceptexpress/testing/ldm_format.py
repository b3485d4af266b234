"""Diffusers → original LDM (CompVis / A1111) state-dict layout for Stable Diffusion 1.x / 2.x and SDXL.

The inverse of what diffusers' ``from_single_file`` converters undo: the UNet goes under
``model.diffusion_model.*`` (``input_blocks`` / ``middle_block`` / ``output_blocks``), the VAE under
``first_stage_model.*`` (``encoder.down.N.block.M`` / ``mid.block_1`` / ``decoder.up.N``, attention as 1×1
convolutions), the text encoder under ``cond_stage_model.transformer.text_model.*`` (SD 1.x, Hugging Face
CLIP names) or ``cond_stage_model.model.*`` (SD 2.x, OpenCLIP names with fused ``in_proj`` attention); SDXL's
two encoders under ``conditioner.embedders.0.transformer.*`` and ``conditioner.embedders.1.model.*``.

Pure functions on ``{name: tensor}`` dicts; the key prefixes are the reader's
(:mod:`conceptexpress.models.single_file`). A test helper, beside :mod:`conceptexpress.testing`. Tensors are passed through
unchanged (same dtype, same storage) except where the layouts differ in shape: VAE attention weights
(``(C, C)`` ↔ ``(C, C, 1, 1)``) and OpenCLIP's fused q/k/v projections. Used to write single-file test
checkpoints (:func:`conceptexpress.testing.save_tiny_single_file`) that go through the same
``from_single_file`` path as a user's ``v2-1_512-ema-pruned.safetensors``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..models.single_file import (
    CLIP_PREFIX,
    OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX,
    SDXL_OPEN_CLIP_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)

TEXT_ENCODER_LAYOUTS = ("clip", "open_clip")

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    # SDXL's added (pooled text + time ids) embedding; LDM keeps it in a Sequential named label_emb.
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# LDM's ResBlock keeps the layers in Sequentials: in_layers = (norm, SiLU, conv), out_layers = (norm, SiLU,
# dropout, conv), emb_layers = (SiLU, linear); hence the gaps in the indices.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_TOP = {
    "encoder.conv_norm_out": "encoder.norm_out",
    "decoder.conv_norm_out": "decoder.norm_out",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _split_module(rest: str) -> tuple[str, str]:
    """``"conv1.weight"`` → ``("conv1", "weight")``; ``"to_out.0.bias"`` → ``("to_out.0", "bias")``."""
    module, _, param = rest.rpartition(".")
    return module, param


def _count(keys, pattern: str) -> int:
    """Number of distinct values of the single ``(\\d+)`` group of ``pattern`` among ``keys``."""
    rx = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := rx.match(k))})


def _resnet_unet(rest: str) -> str:
    module, param = _split_module(rest)
    if module not in _UNET_RESNET:
        raise ValueError(f"unexpected UNet resnet parameter {rest!r}")
    return f"{_UNET_RESNET[module]}.{param}"


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to LDM ``openaimodel.UNetModel`` names (no prefix).

    The block numbering follows LDM's flat lists: ``input_blocks.0`` is ``conv_in``; each down level then
    holds ``layers_per_block`` (resnet[, attention]) entries plus one downsampler (not on the last level);
    ``middle_block`` is (resnet, attention, resnet); each up level holds ``layers_per_block + 1`` entries,
    the last one also carrying the upsampler at index 1 (no attention) or 2 (after the attention).
    ``layers_per_block`` is read from the keys and must be the same on every level, as in SD 1.x / 2.x.
    """
    keys = list(state_dict)
    per_level = {
        _count(keys, rf"down_blocks\.{b}\.resnets\.(\d+)\.")
        for b in range(_count(keys, r"down_blocks\.(\d+)\."))
    }
    if len(per_level) != 1:
        raise ValueError(f"UNet levels have different numbers of resnets {sorted(per_level)}; LDM needs one")
    n = per_level.pop()  # layers_per_block
    up_with_attention = {
        int(m.group(1)) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))
    }

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, param = _split_module(key)
        if module in _UNET_TOP:
            out[f"{_UNET_TOP[module]}.{param}"] = tensor
        elif m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = 1 + b * (n + 1) + j
            if kind == "resnets":
                out[f"input_blocks.{index}.0.{_resnet_unet(rest)}"] = tensor
            else:  # attention blocks keep diffusers' inner names (norm, proj_in, transformer_blocks, proj_out)
                out[f"input_blocks.{index}.1.{rest}"] = tensor
        elif m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            b, rest = int(m[1]), m[2]
            out[f"input_blocks.{1 + b * (n + 1) + n}.0.op.{rest}"] = tensor
        elif m := re.match(r"mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"middle_block.{2 * int(m[1])}.{_resnet_unet(m[2])}"] = tensor
        elif m := re.match(r"mid_block\.attentions\.0\.(.+)", key):
            out[f"middle_block.1.{m[1]}"] = tensor
        elif m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
            b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
            index = b * (n + 1) + j
            if kind == "resnets":
                out[f"output_blocks.{index}.0.{_resnet_unet(rest)}"] = tensor
            else:
                out[f"output_blocks.{index}.1.{rest}"] = tensor
        elif m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            b, rest = int(m[1]), m[2]
            slot = 2 if b in up_with_attention else 1
            out[f"output_blocks.{b * (n + 1) + n}.{slot}.conv.{rest}"] = tensor
        else:
            # Refuse rather than drop: a silently missing tensor would only show up at load time, as a
            # parameter left uninitialized.
            raise ValueError(f"UNet parameter {key!r} has no LDM equivalent (SD 1.x / 2.x / SDXL UNets only)")
    return out


def _resnet_vae(rest: str) -> str:
    return rest.replace("conv_shortcut.", "nin_shortcut.")


def _vae_attention(rest: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    module, param = _split_module(rest)
    if module not in _VAE_ATTENTION:
        raise ValueError(f"unexpected VAE attention parameter {rest!r}")
    # LDM's AttnBlock uses 1×1 convolutions where diffusers uses linear layers: (C, C) → (C, C, 1, 1).
    if param == "weight" and module != "group_norm" and tensor.ndim == 2:
        tensor = tensor[:, :, None, None]
    return f"{_VAE_ATTENTION[module]}.{param}", tensor


def vae_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to LDM ``AutoencoderKL`` names (no prefix).

    The decoder's up levels are numbered in reverse in LDM (``decoder.up.0`` is the full-resolution level,
    diffusers' last ``up_blocks`` entry), and the mid-block resnets are ``block_1`` / ``block_2``.
    """
    keys = list(state_dict)
    n_up = _count(keys, r"decoder\.up_blocks\.(\d+)\.")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, param = _split_module(key)
        if module in _VAE_TOP:
            out[f"{_VAE_TOP[module]}.{param}"] = tensor
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[f"encoder.down.{m[1]}.block.{m[2]}.{_resnet_vae(m[3])}"] = tensor
        elif m := re.match(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
            out[f"encoder.down.{m[1]}.downsample.conv.{m[2]}"] = tensor
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            out[f"decoder.up.{n_up - 1 - int(m[1])}.block.{m[2]}.{_resnet_vae(m[3])}"] = tensor
        elif m := re.match(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", key):
            out[f"decoder.up.{n_up - 1 - int(m[1])}.upsample.conv.{m[2]}"] = tensor
        elif m := re.match(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            out[f"{m[1]}.mid.block_{int(m[2]) + 1}.{_resnet_vae(m[3])}"] = tensor
        elif m := re.match(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key):
            name, tensor = _vae_attention(m[2], tensor)
            out[f"{m[1]}.mid.attn_1.{name}"] = tensor
        elif re.match(r"(encoder|decoder)\.conv_(in|out)\.|(post_)?quant_conv\.", key):
            out[key] = tensor  # same name in both layouts
        else:
            raise ValueError(f"VAE parameter {key!r} has no LDM equivalent (SD 1.x / 2.x VAEs only)")
    return out


def clip_text_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 1.x layout: the Hugging Face ``CLIPTextModel`` names under ``text_model.`` (no prefix).

    transformers ≥ 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` level); earlier versions have it.
    Both inputs give the same output.
    """
    return {f"text_model.{key.removeprefix('text_model.')}": t for key, t in state_dict.items()}


def clip_text_to_open_clip(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SD 2.x / SDXL layout: OpenCLIP ``TextTransformer`` names (no prefix).

    q/k/v projections are fused into ``attn.in_proj_{weight,bias}`` (rows q, then k, then v), as OpenCLIP's
    ``nn.MultiheadAttention`` stores them. A ``CLIPTextModelWithProjection`` state dict (SDXL's encoder 2)
    carries ``text_projection.weight`` (projection, width): OpenCLIP stores the transpose, a bare
    ``text_projection`` parameter (width, projection). ``CLIPTextModel`` has none (SD 2.x never uses it); it
    is written as the identity so the key set matches real SD 2.x files, whose converter reads the model
    width from its shape. Real SD 2.x files also carry a 24th transformer layer that diffusers drops (SD 2.x
    conditions on the penultimate layer); it has no counterpart here.
    """
    projection = state_dict.get("text_projection.weight")
    sd = {key.removeprefix("text_model."): t for key, t in state_dict.items() if key != "text_projection.weight"}
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in sd.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor  # a bare Parameter in OpenCLIP, hence no ".weight"
        elif key == "embeddings.position_ids":
            continue  # a constant buffer (arange) that OpenCLIP does not store
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.removeprefix("final_layer_norm.")] = tensor
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v)_proj\.(weight|bias)", key):
            fused.setdefault(f"transformer.resblocks.{m[1]}.attn.in_proj_{m[3]}", {})[m[2]] = tensor
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.+)", key):
            module, param = _split_module(m[2])
            if module not in _OPEN_CLIP_LAYER:
                raise ValueError(f"CLIP text-encoder parameter {key!r} has no OpenCLIP equivalent")
            out[f"transformer.resblocks.{m[1]}.{_OPEN_CLIP_LAYER[module]}.{param}"] = tensor
        else:
            raise ValueError(f"CLIP text-encoder parameter {key!r} has no OpenCLIP equivalent")
    for name, parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"{name}: q/k/v projections incomplete, found {sorted(parts)}")
        out[name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    width = out["token_embedding.weight"].shape[1]
    if projection is None:
        out["text_projection"] = torch.eye(width, dtype=out["token_embedding.weight"].dtype)
    else:
        out["text_projection"] = projection.T  # (width, projection)
    return out


def pipeline_to_ldm(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    *,
    text_encoder_layout: str = "clip",
) -> dict[str, torch.Tensor]:
    """One LDM single-file state dict from the three diffusers component state dicts.

    ``text_encoder_layout="clip"`` writes SD 1.x names (``cond_stage_model.transformer.text_model.*``),
    ``"open_clip"`` SD 2.x names (``cond_stage_model.model.*``). Keys never collide between components.
    """
    if text_encoder_layout not in TEXT_ENCODER_LAYOUTS:
        raise ValueError(
            f"`text_encoder_layout` must be one of {TEXT_ENCODER_LAYOUTS}, got {text_encoder_layout!r}"
        )
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae).items()})
    if text_encoder_layout == "clip":
        out.update({CLIP_PREFIX + k: v for k, v in clip_text_to_ldm(text_encoder).items()})
    else:
        out.update({OPEN_CLIP_PREFIX + k: v for k, v in clip_text_to_open_clip(text_encoder).items()})
    return out


def sdxl_pipeline_to_ldm(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor],
    text_encoder: Mapping[str, torch.Tensor],
    text_encoder_2: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """One SDXL single-file state dict (``sd_xl_base_1.0.safetensors`` layout) from the diffusers component
    state dicts: UNet and VAE as for SD (the UNet's added embedding as ``label_emb``), ``text_encoder``
    (``CLIPTextModel``) under ``conditioner.embedders.0.transformer.text_model.*``, ``text_encoder_2``
    (``CLIPTextModelWithProjection``) in OpenCLIP names under ``conditioner.embedders.1.model.*``.
    """
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae).items()})
    out.update({SDXL_CLIP_PREFIX + k: v for k, v in clip_text_to_ldm(text_encoder).items()})
    out.update({SDXL_OPEN_CLIP_PREFIX + k: v for k, v in clip_text_to_open_clip(text_encoder_2).items()})
    return out
