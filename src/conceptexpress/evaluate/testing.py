"""Tiny random CLIP, DINO and SAM models for tests and offline trials of ``conceptexpress evaluate``.

Configs are written in code (nothing downloads); each folder is saved with ``save_pretrained`` together with its
image processor, in the layout of the hub checkpoints, and loads back through the same
:class:`~conceptexpress.evaluate.encoders.ClipImageEncoder`, :class:`~conceptexpress.evaluate.encoders.DinoImageEncoder`
and :class:`~conceptexpress.evaluate.sam.SamMasker` users hit. The numbers they give are meaningless.

    python -m conceptexpress.evaluate.testing /tmp/tiny-eval
    conceptexpress evaluate RUNS --clip /tmp/tiny-eval/clip --dino /tmp/tiny-eval/dino --sam /tmp/tiny-eval/sam
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..models.hf import pil_processor_class, quiet_transformers

__all__ = ["save_tiny_clip", "save_tiny_dino", "save_tiny_eval_models", "save_tiny_sam"]


def save_tiny_clip(path: str | Path, *, seed: int = 0) -> Path:
    """A full ``CLIPModel`` (text and vision towers, like ``openai/clip-vit-base-patch32``) at toy size.

    Vision: 2 layers, width 32, 32 px input, patch 8; projection 16-D (the feature width). Processor: shorter side
    resized to 32 px, centre crop 32 px, CLIP mean/std.
    """
    from transformers import CLIPConfig, CLIPModel

    path = Path(path)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=77, projection_dim=16, bos_token_id=97, eos_token_id=98, pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8, projection_dim=16,
        ),
        projection_dim=16,
    )
    with torch.random.fork_rng(), quiet_transformers():  # seeded weights without touching the caller's RNG
        torch.manual_seed(seed)
        CLIPModel(config).save_pretrained(path)
        pil_processor_class("CLIPImageProcessor")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def save_tiny_dino(path: str | Path, *, seed: int = 0) -> Path:
    """A ``ViTModel`` without pooler (like ``facebook/dino-vits16``): 2 layers, width 32, 32 px input, patch 8.

    Processor: resized to 32 × 32, ImageNet mean/std.
    """
    from transformers import ViTConfig, ViTModel

    path = Path(path)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, image_size=32, patch_size=8
    )
    with torch.random.fork_rng(), quiet_transformers():
        torch.manual_seed(seed)
        ViTModel(config, add_pooling_layer=False).save_pretrained(path)
        pil_processor_class("ViTImageProcessor")(
            size={"height": 32, "width": 32}, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]
        ).save_pretrained(path)
    return path


def save_tiny_sam(path: str | Path, *, seed: int = 0) -> Path:
    """A ``SamModel`` at toy size with its ``SamProcessor``.

    Vision encoder: 2 layers, width 32, 64 px input (longest side resized to 64, padded to 64 × 64), patch 8,
    window 4; prompt encoder and mask decoder width 32; 3 multimask outputs like SAM.
    """
    from transformers import SamConfig, SamModel, SamProcessor

    path = Path(path)
    config = SamConfig(
        vision_config=dict(
            hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2, image_size=64,
            patch_size=8, window_size=4, global_attn_indexes=[1], num_pos_feats=16, mlp_dim=64,
        ),
        prompt_encoder_config=dict(hidden_size=32, image_size=64, patch_size=8, mask_input_channels=4),
        mask_decoder_config=dict(
            hidden_size=32, mlp_dim=64, num_hidden_layers=2, num_attention_heads=2, iou_head_hidden_dim=16
        ),
    )
    image_processor = pil_processor_class("SamImageProcessor")(
        size={"longest_edge": 64},
        pad_size={"height": 64, "width": 64},
        mask_size={"longest_edge": 16},
        mask_pad_size={"height": 16, "width": 16},
    )
    with torch.random.fork_rng(), quiet_transformers():
        torch.manual_seed(seed)
        SamModel(config).save_pretrained(path)
        SamProcessor(image_processor=image_processor).save_pretrained(path)
    return path


def save_tiny_eval_models(root: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """``root/clip``, ``root/dino``, ``root/sam`` from the three functions above; returns ``{name: folder}``."""
    root = Path(root)
    return {
        "clip": save_tiny_clip(root / "clip", seed=seed),
        "dino": save_tiny_dino(root / "dino", seed=seed),
        "sam": save_tiny_sam(root / "sam", seed=seed),
    }


def _main(argv: list[str] | None = None) -> int:
    """``python -m conceptexpress.evaluate.testing ROOT``: tiny random CLIP, DINO and SAM in ROOT/clip, dino, sam."""
    args = sys.argv[1:] if argv is None else list(argv)
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m conceptexpress.evaluate.testing ROOT  (writes ROOT/clip, ROOT/dino, ROOT/sam)",
              file=sys.stderr)
        return 2
    paths = save_tiny_eval_models(Path(args[0]))
    print(" ".join(f"--{name} {path}" for name, path in paths.items()))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
