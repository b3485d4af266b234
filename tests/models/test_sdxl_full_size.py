"""Full-size SDXL base architecture on the meta device (no memory, no weights): parameters, attention layers and
the token counts each layer sees at 1024 px, measured on the real diffusers modules with forward hooks.

Slow-marked (CI runs it); ~10 s, most of it building the 2.6 B-parameter module tree.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def unet():
    from conceptexpress.testing import sdxl_unet

    return sdxl_unet(device="meta", dtype=torch.float16)


def test_parameters_and_attention_layers(unet):
    n = sum(p.numel() for p in unet.parameters())
    assert abs(n / 2.567e9 - 1) < 0.01, n  # 2.57 B
    names = list(unet.attn_processors)
    assert sum(k.endswith("attn1.processor") for k in names) == 70
    assert sum(k.endswith("attn2.processor") for k in names) == 70


def test_tokens_seen_at_1024_px(unet):
    from diffusers.models.attention_processor import Attention

    seen: dict[str, tuple[int, int | None]] = {}

    def hook(name):
        def record(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            context = kwargs.get("encoder_hidden_states")
            seen[name] = (hidden.shape[1], None if context is None else context.shape[-1])

        return record

    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True)
               for n, m in unet.named_modules() if isinstance(m, Attention)]  # fmt: skip
    meta = dict(device="meta", dtype=torch.float16)
    try:
        with torch.no_grad():
            out = unet(
                torch.empty(1, 4, 128, 128, **meta),  # 1024 px / 8
                torch.tensor([10], device="meta"),
                encoder_hidden_states=torch.empty(1, 77, 2048, **meta),
                added_cond_kwargs={"text_embeds": torch.empty(1, 1280, **meta), "time_ids": torch.empty(1, 6, **meta)},
            ).sample
    finally:
        for h in handles:
            h.remove()
    assert out.shape == (1, 4, 128, 128)
    kinds = Counter((name.rsplit(".", 1)[-1], tokens) for name, (tokens, _) in seen.items())
    # no attention at 128²; 64² (4,096 tokens): 10 layers; 32² (1,024 tokens): 60 layers — self and cross alike
    assert kinds == {("attn1", 64 * 64): 10, ("attn1", 32 * 32): 60, ("attn2", 64 * 64): 10, ("attn2", 32 * 32): 60}
    assert all(ctx is None for name, (_, ctx) in seen.items() if name.endswith("attn1"))
    assert {ctx for name, (_, ctx) in seen.items() if name.endswith("attn2")} == {2048}


def test_random_pipeline_on_meta(tmp_path):
    from conceptexpress.models.family import SDXL, family_of
    from conceptexpress.testing import sdxl_random_pipeline

    pipe = sdxl_random_pipeline(tmp_path / "tok", device="meta", dtype=torch.bfloat16)
    assert family_of(pipe) is SDXL and pipe.unet.dtype == torch.bfloat16
    assert SDXL.embedding_dims(pipe) == (768, 1280) and SDXL.native_resolution(pipe) == 1024
    g = pipe.text_encoder_2.config
    assert (g.num_hidden_layers, g.num_attention_heads, g.intermediate_size, g.projection_dim) == (32, 20, 5120, 1280)
    assert pipe.text_encoder.config.num_hidden_layers == 12 and pipe.vae.config.scaling_factor == 0.13025
    assert round(sum(p.numel() for p in pipe.text_encoder_2.parameters()) / 1e6) == 695  # OpenCLIP bigG text


def test_the_localization_capture_on_the_full_size_unet(unet):
    """What the localization pass captures at 1024 px, through the real capture and accumulators: all 70
    self-attention layers folded onto the 64×64 clustering grid (heads averaged as captured) and the 60
    cross-attention layers at latent/4 = 32×32 for the [EOT] map."""
    from types import SimpleNamespace

    from conceptexpress.attention.aggregate import CrossAttentionAccumulator, SelfAttentionAccumulator
    from conceptexpress.attention.capture import capture_attention
    from conceptexpress.models.family import SDXL

    grid = SDXL.clustering_grid(SimpleNamespace(unet=unet), (128, 128))
    assert grid == (64, 64)
    self_acc = SelfAttentionAccumulator(grid)
    cross_acc = CrossAttentionAccumulator(grid, [1])
    meta = dict(device="meta", dtype=torch.float16)
    with torch.no_grad(), capture_attention(unet, (128, 128), self_attention=self_acc, cross_attention=cross_acc,
                                            cross_downsample=SDXL.cross_attention_divisor,
                                            head_chunk=SDXL.localize_head_chunk):
        unet(torch.empty(1, 4, 128, 128, **meta), torch.tensor([0], device="meta"),
             encoder_hidden_states=torch.empty(1, 77, 2048, **meta),
             added_cond_kwargs={"text_embeds": torch.empty(1, 1280, **meta), "time_ids": torch.empty(1, 6, **meta)})
    assert self_acc.num_layers == 70 and cross_acc.num_layers == 60
    assert tuple(self_acc.result().shape) == (1, 64 * 64, 64 * 64)
    assert tuple(cross_acc.result().shape) == (1, 1, 64, 64)
