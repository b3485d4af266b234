"""Full-size SD 2.1-base architecture with random weights: shapes, layer counts, and a localization pass.

Slow (builds the 1.3 B-parameter pipeline in memory; the module takes ~37 s of CPU), behind the `slow` marker; CI still runs it.
Loading from a folder is the same code at any size and is tested on the tiny pipelines (tests/models/test_models.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "coffee.jpg"


@pytest.fixture(scope="module")
def sd21(tmp_path_factory):
    from conceptexpress.testing import sd21_random_pipeline

    return sd21_random_pipeline(tmp_path_factory.mktemp("sd21") / "tokenizer")


def test_architecture_matches_sd21_base(sd21):
    unet = sd21.unet
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 865.9
    names = list(unet.attn_processors)
    assert sum(n.endswith("attn1.processor") for n in names) == 16
    assert sum(n.endswith("attn2.processor") for n in names) == 16
    assert sd21.text_encoder.config.hidden_size == 1024 and sd21.text_encoder.config.num_hidden_layers == 23
    assert sd21.vae_scale_factor == 8 and unet.config.sample_size * sd21.vae_scale_factor == 512
    assert sd21.tokenizer.pad_token == "!"


def test_localization_pass_at_512(sd21):
    from conceptexpress import LocalizeConfig, localize_concepts

    loc = localize_concepts(EXAMPLE, sd21, LocalizeConfig())
    assert loc.work_size == (512, 344)  # 600×400 photo: longer side 512, shorter side to a multiple of 8
    assert loc.latent_hw == (43, 64)
    assert loc.self_attention_layers == 16
    assert loc.cross_attention_layers == 5  # latent/4 level: down_blocks.2 ×2 + up_blocks.1 ×3
    assert loc.masks.shape[1:] == (400, 600)
    n = loc.num_concepts
    assert loc.clusters.centroids.shape == (n, 43 * 64)
    if n:
        torch.testing.assert_close(loc.clusters.centroids.sum(-1), torch.ones(n), atol=1e-4, rtol=0)


def test_one_training_step_full_size(sd21):
    """One training step of the full-size architecture at 256 px on CPU (shapes, capture and EMD at latent/4)."""
    from conceptexpress.config import TrainConfig
    from conceptexpress.io.images import load_image
    from conceptexpress.learn.trainer import TokenTrainer

    latent = (22, 32)  # 600×400 photo at 256 px: 256×176 → latent 32×22
    masks = torch.zeros(2, *latent, dtype=torch.bool)
    masks[0, 2:10, 3:12] = True
    masks[1, 10:20, 16:28] = True
    cents = masks.flatten(1).float() + 0.01
    cents = cents / cents.sum(1, keepdim=True)
    # One token per concept (the split phase's bookkeeping does not depend on the model's size and is tested on the
    # tiny pipelines): one micro-batch of the two prompts, half the CPU time of split_tokens=2.
    cfg = TrainConfig(steps=1, merge_step=1, split_tokens=1, micro_batch=2, checkpoint_every=0)
    trainer = TokenTrainer(sd21, load_image(EXAMPLE), (256, 176), masks, cents, cfg)
    before = trainer.vectors.detach().clone()
    result = trainer.train()
    assert result.sample_passes == 2 and result.embeddings.shape == (2, 1024)
    assert not torch.equal(trainer.vectors.detach(), before)
    record = result.history[0]
    assert record["reg"] > 0 and record["mse"] > 0
