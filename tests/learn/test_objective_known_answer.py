"""Known answer for the combined objective of one training step (paper Eq. 12 and 13), worked out by hand.

The trainer runs as in production (prompts, micro-batches, per-prompt gradient copies, masked MSE of Eq. 8,
exact EMD of Eq. 11, contrastive loss of Eq. 10, weights α, β, 1/(gN), the optimizer step) except for the model:
:meth:`TokenTrainer._denoise` and :meth:`TokenTrainer._token_attention` are replaced by an identity-like stub whose
every quantity has a closed form, so the loss and the token gradient can be written down by hand:

* prompt r predicts ``s_r = Σ_{k ∈ slots(r)} v_k[0]`` on every pixel of latent channel 0 and 0 elsewhere, against a
  zero target, so Eq. 8 is ``s_r² · |m_r| / (C·h·w)`` (m_r = the union mask of the prompt's concepts);
* token k's cross-attention is ``softmax(v_k[1], v_k[2])`` on a 1×2 grid, so with the centroid f_i area-averaged to
  that grid, Eq. 11 is ``|c_k0 − t_i0|`` (one unit of mass distance) and its gradient is
  ``sign(c_k0 − t_i0) · c_k0 · c_k1 · (1, −1)`` on (v_k[1], v_k[2]).

The reference below uses only Python floats and numpy, none of the package's loss code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conceptexpress.config import TrainConfig
from conceptexpress.learn.trainer import TokenTrainer

WORK, LATENT = (128, 88), (11, 16)  # the tiny model's working size and latent for the 600×400 example
C = 4  # latent channels
ALPHA, BETA, TAU = 0.3, 0.2, 0.07  # large α and β so that every term shows in the gradient


class StubTrainer(TokenTrainer):
    """TokenTrainer with the identity-like denoiser of the module docstring."""

    def _micro_batch(self, prompts, *args):
        self._stub_prompts = prompts
        return super()._micro_batch(prompts, *args)

    def _denoise(self, input_ids, latents, noise, timesteps):
        v = self._wrapper.batch_vectors  # (b, K, D), this micro-batch's per-prompt copies of the vectors
        s = torch.stack([v[r, list(p.slots), 0].sum() for r, p in enumerate(self._stub_prompts)])  # (b,)
        pred = torch.zeros(len(s), C, *LATENT, dtype=v.dtype)
        pred = pred + torch.nn.functional.pad(s[:, None, None, None].expand(-1, 1, *LATENT), (0, 0, 0, 0, 0, C - 1))
        return pred, torch.zeros_like(pred)

    def _token_attention(self, acc):
        v = self._wrapper.batch_vectors
        width = max(len(p.slots) for p in self._stub_prompts)
        maps = []
        for r, p in enumerate(self._stub_prompts):
            slots = list(p.slots) + [p.slots[0]] * (width - len(p.slots))  # padded like the real capture
            maps.append(torch.stack([torch.softmax(v[r, k, 1:3], 0).view(1, 2) for k in slots]))
        return torch.stack(maps)  # (b, width, 1, 2)


def _inputs():
    masks = torch.zeros(2, *LATENT, dtype=torch.bool)
    masks[0, 2:6, 2:7] = True  # 20 pixels, left half
    masks[1, 5:10, 9:14] = True  # 25 pixels, right half
    cents = masks.flatten(1).float() + 0.05
    return masks, cents / cents.sum(1, keepdim=True)


def _run(pipe, image, **kw):
    """One step of the stub trainer; returns (trainer, vectors before the step, gradient of the step, record)."""
    masks, cents = _inputs()
    cfg = TrainConfig(
        steps=1, split_tokens=2, alpha=ALPHA, beta=BETA, tau=TAU, flip_p=0.0, update_rule="batched", contrastive_form="paper",
        max_grad_norm=0.0, emd_method="exact", checkpoint_every=0, **kw,
    )
    tr = StubTrainer(pipe, image, WORK, masks, cents, cfg)
    seen = {}
    apply = tr._apply

    def spy(grad):
        seen["v"] = tr.vectors.detach().double().numpy().copy()  # what the step's losses were computed at
        seen["g"] = grad.detach().double().numpy().copy()
        return apply(grad)

    tr._apply = spy
    record = tr.train().history[0]
    return tr, seen["v"], seen["g"], record


def _hand_terms(v, masks, cents):
    """Per-token pieces shared by both phases: MSE slope, EMD value and gradient on (v[1], v[2])."""
    e = C * LATENT[0] * LATENT[1]  # Eq. 8 averages over all C·h·w latent elements
    area = [int(m.sum()) for m in masks]
    f = cents.double().view(2, *LATENT).numpy()
    t0 = [fi[:, :8].sum() / fi.sum() for fi in f]  # f_i area-averaged to 1×2, as a distribution: left mass
    c0 = [math.exp(x[1]) / (math.exp(x[1]) + math.exp(x[2])) for x in v]
    return e, area, t0, c0


def _contrastive(v, labels, tau):
    """Eq. 10 by hand: value (1/M)·Σ_j L_j and its gradient w.r.t. the raw vectors (M, D)."""
    m = len(v)
    norms = np.linalg.norm(v, axis=1)
    u = v / norms[:, None]
    s = u @ u.T / tau
    losses, g_u = [], np.zeros_like(v)
    for j in range(m):
        others = [q for q in range(m) if q != j]
        pos = [q for q in others if labels[q] == labels[j]]
        all_sum = sum(math.exp(s[j, q]) for q in others)
        pos_sum = sum(math.exp(s[j, q]) for q in pos)
        losses.append(-(math.log(pos_sum) - math.log(all_sum)) / m)
        for q in others:
            d = -((math.exp(s[j, q]) / pos_sum if q in pos else 0.0) - math.exp(s[j, q]) / all_sum) / m  # ∂L_j/∂s_jq
            g_u[j] += d * u[q] / tau
            g_u[q] += d * u[j] / tau
    g_v = np.stack([(g_u[k] - u[k] * (u[k] @ g_u[k])) / norms[k] for k in range(m)])  # through u = v/|v|
    return sum(losses) / m, g_v / m


def test_eq12_split_step_loss_and_gradient(pipe, image):
    """Split phase, g = 2, N = 2: L = (1/gN) Σ_ij (L_ij + α L^con_ij + β L^reg_ij), micro-batches of 3 + 1 prompts."""
    masks, cents = _inputs()
    tr, v, grad, record = _run(pipe, image, merge_step=1, micro_batch=3)
    k_total, n = 4, 2
    assert [p.slots for p in tr.split_prompts] == [(0,), (1,), (2,), (3,)]  # row k = j·N + i: concept k % N
    e, area, t0, c0 = _hand_terms(v, masks, cents)

    mse = [v[k, 0] ** 2 * area[k % n] / e for k in range(k_total)]
    emd = [abs(c0[k] - t0[k % n]) for k in range(k_total)]
    con, con_grad = _contrastive(v[:k_total], [k % n for k in range(k_total)], TAU)
    loss = sum(mse) / k_total + BETA * sum(emd) / k_total + ALPHA * con
    expected = np.zeros_like(v)
    for k in range(k_total):
        expected[k, 0] = 2 * v[k, 0] * area[k % n] / e / k_total
        slope = math.copysign(1.0, c0[k] - t0[k % n]) * c0[k] * (1 - c0[k]) * BETA / k_total
        expected[k, 1], expected[k, 2] = slope, -slope
    expected[:k_total] += ALPHA * con_grad

    assert record["phase"] == "split" and record["prompts"] == 4
    assert record["mse"] == pytest.approx(sum(mse) / k_total, rel=1e-5)
    assert record["reg"] == pytest.approx(sum(emd) / k_total, rel=1e-5)
    assert record["con"] == pytest.approx(con, rel=1e-5)
    assert record["loss"] == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
    assert np.abs(con_grad).max() > 1e-3 and np.abs(expected[:, 1]).max() > 1e-3  # every term is visible


def test_eq13_merged_step_loss_and_gradient(pipe, image):
    """Merged phase, N = 2, with the released joint prompt: L = (1/(N+1)) Σ_prompts (L_r + β Σ_tokens L^reg)."""
    masks, cents = _inputs()
    tr, v, grad, record = _run(pipe, image, merge_step=0, micro_batch=0)
    n = 2
    assert [p.slots for p in tr.merged_prompts] == [(0,), (1,), (0, 1)]
    e, area, t0, c0 = _hand_terms(v, masks, cents)
    union = int((masks[0] | masks[1]).sum())
    s_joint = v[0, 0] + v[1, 0]
    emd = [abs(c0[i] - t0[i]) for i in range(n)]
    per_prompt = [v[i, 0] ** 2 * area[i] / e + BETA * emd[i] for i in range(n)]
    per_prompt.append(s_joint**2 * union / e + BETA * (emd[0] + emd[1]))  # T11: the joint prompt sums its tokens
    loss = sum(per_prompt) / (n + 1)
    expected = np.zeros_like(v)  # the unused split rows (N…gN−1) get no gradient after the merge
    for i in range(n):
        expected[i, 0] = (2 * v[i, 0] * area[i] + 2 * s_joint * union) / e / (n + 1)
        slope = 2 * math.copysign(1.0, c0[i] - t0[i]) * c0[i] * (1 - c0[i]) * BETA / (n + 1)  # own + joint prompt
        expected[i, 1], expected[i, 2] = slope, -slope

    assert record["phase"] == "merged" and record["prompts"] == 3 and record["con"] == 0.0
    assert record["loss"] == pytest.approx(loss, rel=1e-5)
    np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-7)
