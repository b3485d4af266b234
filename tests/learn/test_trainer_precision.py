"""Mixed precision of token learning (DESIGN §4): fp32 token vectors, bf16 autocast, fp16 autocast + loss scaling.

CUDA is not available in CI, so the autocast paths run on CPU with an explicit ``mixed_precision``; the trainer
code is the same on both devices (``torch.autocast(device.type, …)``, ``torch.amp.GradScaler(device.type)``).
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from conceptexpress.config import TrainConfig
from conceptexpress.learn.trainer import TokenTrainer

WORK, LATENT = (128, 88), (11, 16)  # the tiny model's working size and latent for the 600×400 example
# Multiplies each prompt's loss: makes dL/d(UNet output) of the tiny model ~1e-6, the size it has for SD 2.1 at
# 512 px (mean over 4·64·64 latent elements, ~15 prompts per step), where fp16 gradients underflow.
SD_SIZED_LOSS = 1e-3


def _cpu_fp16_autocast() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            x = torch.ones(2, 2, requires_grad=True)
            (x @ x).sum().backward()
        return True
    except RuntimeError:
        return False


def _trainer(pipe, image, **kw) -> TokenTrainer:
    masks = torch.zeros(2, *LATENT, dtype=torch.bool)
    masks[0, 2:6, 2:7] = True
    masks[1, 5:10, 9:14] = True
    cents = masks.flatten(1).float() + 0.05
    cents = cents / cents.sum(1, keepdim=True)
    cfg = {"steps": 1, "merge_step": 1, "split_tokens": 3, "micro_batch": 0, "checkpoint_every": 0, **kw}
    return TokenTrainer(pipe, image, WORK, masks, cents, TrainConfig(**cfg))


def _first_grad(tr: TokenTrainer, loss_factor: float = 1.0) -> torch.Tensor:
    """Token gradient of the first optimizer step (unscaled, before clipping), after one training step."""
    grads: list[torch.Tensor] = []
    apply, micro = tr._apply, tr._micro_batch
    tr._apply = lambda g: (grads.append(g.detach().clone()), apply(g))[1]
    tr._micro_batch = lambda *args: micro(*args[:-1], args[-1] * loss_factor)
    tr.train()
    return grads[0]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


MODES = ["bf16", pytest.param("fp16", marks=pytest.mark.skipif(not _cpu_fp16_autocast(), reason="no fp16 autocast on this CPU"))]


@pytest.mark.parametrize("mode", MODES)
def test_autocast_step_matches_fp32(pipe, image, one_torch_thread, mode):
    ref = _first_grad(_trainer(pipe, image, mixed_precision="no"))
    tr = _trainer(pipe, image, mixed_precision=mode)
    grad = _first_grad(tr)
    assert tr.vectors.dtype == torch.float32  # master weights
    assert grad.abs().sum() > 0 and _cosine(grad, ref) > 0.99
    assert tr.scaler.is_enabled() == (mode == "fp16")  # bf16 keeps fp32's exponent range: no scaling
    if mode == "fp16":
        assert tr.history[0]["loss_scale"] == 65536.0 and tr.history[0]["skipped"] is False


def test_cpu_auto_is_fp32_without_scaling(pipe, image):
    tr = _trainer(pipe, image)
    assert tr.runtime.mixed_precision == "auto" and tr.amp_dtype is None and not tr.scaler.is_enabled()


@pytest.mark.skipif(not _cpu_fp16_autocast(), reason="no fp16 autocast on this CPU")
def test_unscaled_fp16_gradient_underflows_and_loss_scaling_recovers_it(pipe, image, one_torch_thread):
    # Merged phase: no contrastive term, whose fp32 gradient would not pass through the UNet.
    ref = _first_grad(_trainer(pipe, image, mixed_precision="no", merge_step=0), SD_SIZED_LOSS)
    assert ref.abs().sum() > 0

    unscaled = _trainer(pipe, image, mixed_precision="fp16", merge_step=0)
    unscaled.scaler = torch.amp.GradScaler("cpu", enabled=False)  # the old GPU path: fp16 without scaling
    assert torch.count_nonzero(_first_grad(unscaled, SD_SIZED_LOSS)) == 0  # every token gradient flushed to zero

    scaled = _trainer(pipe, image, mixed_precision="fp16", merge_step=0)
    grad = _first_grad(scaled, SD_SIZED_LOSS)
    assert _cosine(grad, ref) > 0.99
    torch.testing.assert_close(grad.norm(), ref.norm(), rtol=0.02, atol=0)  # unscaled back to fp32's size


@pytest.mark.skipif(not _cpu_fp16_autocast(), reason="no fp16 autocast on this CPU")
def test_overflowing_fp16_step_is_skipped_and_logged(pipe, image, one_torch_thread, caplog):
    tr = _trainer(pipe, image, mixed_precision="fp16")
    before = tr.vectors.detach().clone()
    tr.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)  # the scaled gradients overflow fp16
    with caplog.at_level(logging.WARNING, logger="conceptexpress.learn.trainer"):
        result = tr.train()
    first = result.history[0]
    assert first["skipped"] is True and first["loss_scale"] == 2.0**40
    assert torch.equal(tr.vectors.detach(), before)
    assert result.optimizer_steps == 0 and result.skipped_steps == 1
    assert "optimizer step skipped" in caplog.text
    assert tr.scaler.get_scale() == 2.0**39  # GradScaler backs off
    assert torch.isfinite(torch.tensor(first["loss"]))
