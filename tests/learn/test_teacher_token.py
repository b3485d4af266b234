"""Known answer of token learning for every model family: a hidden "teacher" token must be found again.

On a tiny random pipeline of each family (SD 1.x, SD 2.x, SDXL — loaded through ``load_pipeline``, the user's
path) hidden token vectors e* are drawn (both vectors for SDXL: 768-d and 1280-d in the real model, the two tiny
widths here). The training target of every step is the model's own prediction under the prompt holding e*, made
through the trainer's denoiser seam (:meth:`TokenTrainer._denoise`): the masked ε-MSE of Eq. 8 then has its minimum
at e*. Training starts from other vectors and must bring the loss on a fixed batch down by ≥ 90 % and move the
learned vectors towards e* — cosine up for each encoder's part.

A second check pins the gradient itself: the autograd directional derivative of that loss (float64) equals the
finite-difference one. It is what fails when SDXL's pooled embedding is cut from the token (the context path still
trains, but the pooled term's share of the gradient is gone).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from conceptexpress.config import TrainConfig
from conceptexpress.learn.tokens import encoder_columns, init_from_vocabulary, spliced_tokens
from conceptexpress.learn.trainer import TokenTrainer
from conceptexpress.models import load_pipeline

WORK = (64, 64)  # tiny pictures: latent 8×8 (SDXL's clustering grid 4×4)
STEPS, LR = 40, 2e-2
TIMESTEPS = (50, 250, 450, 650, 850)  # the fixed batch the loss is measured on


class TeacherTrainer(TokenTrainer):
    """The trainer with its target replaced by the model's prediction under the hidden vectors ``teacher``."""

    teacher: torch.Tensor  # (K, ΣD)

    def _denoise(self, input_ids, latents, noise, timesteps):
        pred, _ = super()._denoise(input_ids, latents, noise, timesteps)
        learner = self._wrapper.batch_vectors
        self._wrapper.batch_vectors = self.teacher.to(self.device).expand(len(latents), -1, -1)
        with torch.no_grad():
            target, _ = super()._denoise(input_ids, latents, noise, timesteps)
        self._wrapper.batch_vectors = learner
        return pred, target


def _loss(tr: TeacherTrainer, vectors: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
    """Mean squared distance to the teacher's prediction on a fixed batch (prompt "a photo of <c1>")."""
    gen = torch.Generator().manual_seed(123)
    b = len(TIMESTEPS)
    ids = tr.merged_prompts[0].input_ids.unsqueeze(0).expand(b, -1, -1)
    latents = tr.post_mean[0].expand(b, -1, -1, -1)
    noise = torch.randn(latents.shape, generator=gen)
    with torch.set_grad_enabled(grad), spliced_tokens(tr.family.text_encoders(tr.pipe), tr.vectors) as wrapper:
        tr._wrapper = wrapper
        wrapper.batch_vectors = vectors.expand(b, -1, -1)
        pred, target = tr._denoise(ids, latents, noise, torch.tensor(TIMESTEPS))
    return ((pred - target) ** 2).mean()


def _trainer(pipe, **config) -> TeacherTrainer:
    image = Image.fromarray((np.random.RandomState(0).rand(*WORK, 3) * 255).astype("uint8"))
    grid = tuple(n // 8 // (2 if hasattr(pipe, "text_encoder_2") else 1) for n in WORK)
    masks = torch.ones(1, *grid, dtype=torch.bool)  # one concept: the whole picture
    centroids = masks.flatten(1).float() / masks.sum()
    cfg = TrainConfig(
        steps=STEPS, lr=LR, split_merge=False, contrastive=False, attn_reg=False, flip_p=0.0, update_rule="batched",
        max_grad_norm=0.0, weight_decay=0.0, checkpoint_every=0, **config,
    )
    tr = TeacherTrainer(pipe, image, WORK, masks, centroids, cfg)
    bases = [e.get_input_embeddings() for e in tr.family.text_encoders(pipe)]
    tr.teacher = init_from_vocabulary(bases, 1, torch.Generator().manual_seed(7))  # e*: another vocabulary draw
    return tr


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def family_pipe(request, one_torch_thread):
    folder = request.getfixturevalue(f"tiny_{request.param}_dir")
    pipe = load_pipeline(str(folder), device="cpu")
    return request.param, pipe


def test_teacher_token_is_found_again(family_pipe):
    name, pipe = family_pipe
    tr = _trainer(pipe)
    assert tr.family.name == name
    start = tr.vectors.detach().clone()
    before = float(_loss(tr, start))
    tr.train()
    learned = tr.vectors.detach()
    after = float(_loss(tr, learned))
    # Measured: the loss falls by 97.6 % (SD 1.x), 96.4 % (SD 2.x), 95.5 % (SDXL); with SDXL's pooled embedding
    # detached from the token, by 76 %; with encoder 2's vector frozen, by 14 %.
    assert after <= 0.1 * before, (name, before, after)
    cos = torch.nn.functional.cosine_similarity
    widths = tr.family.embedding_dims(pipe)
    assert len(widths) == (2 if name == "sdxl" else 1)
    cosines = [(float(cos(start[0, c], tr.teacher[0, c], dim=0)), float(cos(learned[0, c], tr.teacher[0, c], dim=0)))
               for c in encoder_columns(widths)]
    # The figures of the docstring's measurements: `pytest -s -k teacher_token_is_found` prints them.
    print(f"{name}: loss {before:.4g} -> {after:.4g} (drop {1 - after / before:.1%}); cosine to e* per encoder "
          + ", ".join(f"{was:.3f} -> {now:.3f}" for was, now in cosines))
    for cols, (was, now) in zip(encoder_columns(widths), cosines):
        # Measured (40 steps): SD 1.x −0.18 → 0.12, SD 2.x 0.06 → 0.27, SDXL 0.17 → 0.35 and 0.06 → 0.27; a frozen
        # encoder-2 vector stays at its start. Required: half the smallest measured gain.
        assert now > was + 0.1, (name, cols, was, now)


def test_token_gradient_matches_finite_differences(family_pipe):
    """d/dε L(v + ε·u) at ε = 0: autograd through the family's conditioning (context and, for SDXL, the pooled
    embedding recomputed from the token) against a central difference, in float64."""
    name, pipe = family_pipe
    pipe = pipe.to(torch.float64)
    try:
        tr = _trainer(pipe)
        v = tr.vectors.detach().double().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(_loss(tr, v, grad=True), v)
        u = torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        u = u * v.detach().norm() / u.norm()
        eps = 1e-4
        fd = (float(_loss(tr, v.detach() + eps * u)) - float(_loss(tr, v.detach() - eps * u))) / (2 * eps)
        analytic = float((grad * u).sum())
        assert analytic == pytest.approx(fd, rel=1e-4), (name, analytic, fd)
        for cols in encoder_columns(tr.family.embedding_dims(pipe)):
            assert float(grad[:, cols].norm()) > 0, (name, cols)  # every encoder's part of the token trains
    finally:
        pipe.to(torch.float32)


def test_gradient_checkpointing_defaults_to_the_familys(family_pipe):
    """RuntimeConfig.gradient_checkpointing=None: on for SDXL (its 1024-px activations), off for SD 1.x/2.x; an explicit
    value wins."""
    name, pipe = family_pipe
    assert _trainer(pipe).gradient_checkpointing is (name == "sdxl")
    assert _trainer(pipe, gradient_checkpointing=False).gradient_checkpointing is False
    assert _trainer(pipe, gradient_checkpointing=True).gradient_checkpointing is True
