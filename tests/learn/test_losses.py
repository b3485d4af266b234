"""Token-learning losses (paper Eq. 8, 10, 11): hand computations, gradient directions, and POT's exact EMD."""

from __future__ import annotations

import math

import ot
import pytest
import torch
import torch.nn.functional as F

from conceptexpress.learn.losses import (
    contrastive_loss,
    emd_loss,
    grid_cost,
    masked_denoising_loss,
    supcon_loss,
)

# --------------------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------------------


def _one_pixel(h: int, w: int, y: int, x: int) -> torch.Tensor:
    m = torch.zeros(1, h, w)
    m[0, y, x] = 1.0
    return m  # (1, h, w)


def _attention_like(b: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """Smooth positive fields like a token's cross-attention: upsampled low-resolution noise through a sigmoid."""
    z = torch.randn(b, 1, 4, 4, generator=gen) * 2  # (b, 1, 4, 4)
    z = F.interpolate(z, size=(h, w), mode="bilinear", align_corners=False)  # (b, 1, h, w)
    return torch.sigmoid(z)[:, 0]  # (b, h, w)


def _blobs(b: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian bumps at random places and widths, like a concept centroid f_i."""
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    c = torch.rand(b, 2, generator=gen) * torch.tensor([h, w])
    s = 1 + 3 * torch.rand(b, 1, 1, generator=gen)
    d2 = (ys - c[:, 0, None, None]) ** 2 + (xs - c[:, 1, None, None]) ** 2  # (b, h, w)
    return torch.exp(-d2 / (2 * s * s))


def _pot_emd(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Reference: exact ot.emd2 on numpy, maps normalized here."""
    h, w = a.shape[-2:]
    cost = grid_cost(h, w, dtype=torch.float64).numpy()
    out = []
    for x, y in zip(a.double(), b.double()):
        x = (x / x.sum()).flatten().numpy()
        y = (y / y.sum()).flatten().numpy()
        out.append(float(ot.emd2(x, y, cost)))
    return out


# --------------------------------------------------------------------------------------------------------------
# Eq. 8: masked denoising loss
# --------------------------------------------------------------------------------------------------------------


def test_masked_loss_equals_hand_computation_and_ignores_outside():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.rand(2, 8, 8, generator=g) > 0.5
    loss = masked_denoising_loss(pred, target, mask)
    assert loss.shape == (2,) and loss.dtype == torch.float32
    for i in range(2):
        total = 0.0
        for c in range(4):
            for y in range(8):
                for x in range(8):
                    if mask[i, y, x]:
                        total += float(pred[i, c, y, x] - target[i, c, y, x]) ** 2
        assert loss[i].item() == pytest.approx(total / (4 * 8 * 8), rel=1e-5)
    # Whatever the prediction does outside the mask is not penalized.
    moved = pred + 100.0 * (~mask).unsqueeze(1) * torch.randn(2, 4, 8, 8, generator=g)
    torch.testing.assert_close(masked_denoising_loss(moved, target, mask), loss)
    # (B, 1, h, w) float masks give the same result.
    torch.testing.assert_close(masked_denoising_loss(pred, target, mask.float().unsqueeze(1)), loss)


def test_masked_loss_is_a_mean_over_all_elements_not_the_mask_area():
    pred = torch.ones(1, 4, 8, 8)
    target = torch.zeros(1, 4, 8, 8)
    one = _one_pixel(8, 8, 3, 5)
    # 4 channels × one pixel of unit error, divided by all 4·8·8 elements (area normalization would give 1).
    assert masked_denoising_loss(pred, target, one).item() == pytest.approx(1 / 64)
    assert masked_denoising_loss(pred, target, torch.zeros(1, 8, 8)).item() == 0.0


def test_masked_loss_half_precision_and_gradient():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(2, 4, 8, 8, generator=g)
    target = torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.rand(2, 8, 8, generator=g) > 0.5
    ref = masked_denoising_loss(pred.half().float(), target.half().float(), mask)
    half = masked_denoising_loss(pred.half(), target.half(), mask)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, ref)
    p = pred.clone().requires_grad_(True)
    masked_denoising_loss(p, target, mask).sum().backward()
    assert torch.all(p.grad[~mask.unsqueeze(1).expand_as(p)] == 0)


def test_masked_loss_rejects_bad_shapes():
    x = torch.zeros(2, 4, 8, 8)
    with pytest.raises(ValueError, match="target"):
        masked_denoising_loss(x, torch.zeros(2, 4, 8, 7), torch.ones(2, 8, 8))
    with pytest.raises(ValueError, match="mask"):
        masked_denoising_loss(x, x, torch.ones(2, 4, 4))
    with pytest.raises(ValueError, match="pred"):
        masked_denoising_loss(torch.zeros(4, 8, 8), torch.zeros(4, 8, 8), torch.ones(4, 8, 8))


# --------------------------------------------------------------------------------------------------------------
# Eq. 10: contrastive loss, and the released SupCon variant
# --------------------------------------------------------------------------------------------------------------


def _unit_rows(e: torch.Tensor) -> list[list[float]]:
    rows = e.double().tolist()
    return [[x / math.sqrt(sum(y * y for y in r)) for x in r] for r in rows]


def _eq10_loop(e: torch.Tensor, labels: list[int], tau: float) -> list[float]:
    v = _unit_rows(e)
    m = len(v)

    def s(j, q):
        return sum(x * y for x, y in zip(v[j], v[q])) / tau

    out = []
    for j in range(m):
        num = sum(math.exp(s(j, q)) for q in range(m) if q != j and labels[q] == labels[j])
        den = sum(math.exp(s(j, q)) for q in range(m) if q != j)
        out.append(-math.log(num / den) / m)
    return out


def _supcon_loop(e: torch.Tensor, labels: list[int], tau: float) -> float:
    v = _unit_rows(e)
    m = len(v)

    def s(j, q):
        return sum(x * y for x, y in zip(v[j], v[q])) / tau

    per_anchor = []
    for j in range(m):
        den = sum(math.exp(s(j, q)) for q in range(m) if q != j)
        pos = [q for q in range(m) if q != j and labels[q] == labels[j]]
        per_anchor.append(-sum(math.log(math.exp(s(j, p)) / den) for p in pos) / len(pos))
    return sum(per_anchor) / m


@pytest.mark.parametrize("g,n", [(2, 3), (3, 2)])
def test_contrastive_equals_eq10_by_hand(g, n):
    e = torch.randn(g * n, 4, generator=torch.Generator().manual_seed(g))
    labels = torch.arange(g * n) % n
    ref = _eq10_loop(e, labels.tolist(), 0.07)
    got = contrastive_loss(e * 3.0, labels, tau=0.07)  # scale is irrelevant: rows are normalized
    assert got.shape == (g * n,) and got.dtype == torch.float32
    # float32 loses ~1e-7 absolute in log(num) − log(den) when an anchor is already well separated.
    assert got.tolist() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert contrastive_loss(e.double(), labels, tau=0.07).tolist() == pytest.approx(ref, rel=1e-10)


def test_contrastive_gradient_pulls_positives_together():
    e = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), requires_grad=True)
    labels = torch.arange(6) % 3
    contrastive_loss(e, labels, tau=0.07).sum().backward()
    moved = e.detach() - 0.01 * e.grad
    before, after = F.normalize(e.detach(), dim=1), F.normalize(moved, dim=1)
    same = (labels[:, None] == labels[None]) & ~torch.eye(6, dtype=torch.bool)
    for j, q in same.nonzero().tolist():
        assert after[j] @ after[q] > before[j] @ before[q]
    # ... and pushes the concepts apart on average.
    diff = labels[:, None] != labels[None]
    assert (after @ after.T)[diff].mean() < (before @ before.T)[diff].mean()


def test_supcon_equals_hand_loop_and_differs_from_eq10_with_two_positives():
    gen = torch.Generator().manual_seed(4)
    e3 = torch.randn(6, 4, generator=gen)
    lab3 = torch.arange(6) % 2  # g = 3: two positives per anchor
    sup = supcon_loss(e3, lab3, tau=0.07)
    assert sup.ndim == 0
    assert sup.item() == pytest.approx(_supcon_loop(e3, lab3.tolist(), 0.07), rel=1e-5)
    assert supcon_loss(e3.double(), lab3).item() == pytest.approx(
        _supcon_loop(e3, lab3.tolist(), 0.07), rel=1e-10
    )
    assert abs(sup.item() - contrastive_loss(e3, lab3).sum().item()) > 1e-3
    # One positive per anchor (g = 2): SupCon's mean of logs is the log of the sum, the two coincide.
    e2 = torch.randn(6, 4, generator=gen)
    lab2 = torch.arange(6) % 3
    assert supcon_loss(e2, lab2).item() == pytest.approx(contrastive_loss(e2, lab2).sum().item(), rel=1e-5)


def test_contrastive_rejects_a_label_without_positive():
    e = torch.randn(5, 4)
    labels = torch.tensor([0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="label"):
        contrastive_loss(e, labels)
    with pytest.raises(ValueError, match="label"):
        supcon_loss(e, labels)
    with pytest.raises(ValueError, match="labels"):
        contrastive_loss(e, torch.zeros(4, dtype=torch.long))


def test_contrastive_half_precision():
    e = torch.randn(6, 8, generator=torch.Generator().manual_seed(5))
    labels = torch.arange(6) % 3
    half = contrastive_loss(e.half(), labels)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, contrastive_loss(e.half().float(), labels))


# --------------------------------------------------------------------------------------------------------------
# Eq. 11: EMD alignment
# --------------------------------------------------------------------------------------------------------------


def test_grid_cost_is_pixel_distance_and_cached():
    c = grid_cost(8, 8)
    assert c.shape == (64, 64) and c.dtype == torch.float32
    assert c[1 * 8 + 2, 4 * 8 + 6].item() == pytest.approx(5.0)
    torch.testing.assert_close(c, c.T)
    assert torch.all(c.diagonal() == 0)
    assert grid_cost(8, 8) is c
    assert grid_cost(3, 5)[0, 2 * 5 + 4].item() == pytest.approx(math.hypot(2, 4))


@pytest.mark.parametrize("method,rel", [("exact", 1e-6), ("sinkhorn", 0.02)])
def test_emd_between_one_pixel_maps_is_their_distance(method, rel):
    a = _one_pixel(8, 8, 1, 2)
    b = _one_pixel(8, 8, 4, 6)
    out = emd_loss(a, b, method=method)
    assert out.shape == (1,) and out.dtype == torch.float32
    assert out.item() == pytest.approx(5.0, rel=rel)


@pytest.mark.parametrize("method", ["exact", "sinkhorn"])
def test_emd_gradient_moves_attention_toward_the_target(method):
    gen = torch.Generator().manual_seed(6)
    attn = (torch.rand(1, 8, 8, generator=gen) + 0.1).requires_grad_(True)
    target = _one_pixel(8, 8, 2, 2)
    loss = emd_loss(attn, target, method=method)
    (grad,) = torch.autograd.grad(loss.sum(), attn)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Adding mass at the target pixel costs less than adding it at the far corner.
    assert grad[0, 2, 2] < grad[0, 7, 7]
    assert grad[0, 2, 2] == grad[0].min()
    with torch.no_grad():
        stepped = (attn - 0.5 * grad).clamp_min(0)
        assert emd_loss(stepped, target, method=method).item() < loss.item()


def test_exact_emd_matches_pot_and_its_gradient_is_finite():
    gen = torch.Generator().manual_seed(7)
    attn = _attention_like(3, 16, 16, gen).requires_grad_(True)
    target = _blobs(3, 16, 16, gen)
    out = emd_loss(attn, target, method="exact")
    assert out.tolist() == pytest.approx(_pot_emd(attn.detach(), target), rel=1e-5)
    out.sum().backward()
    assert attn.grad is not None and torch.isfinite(attn.grad).all() and attn.grad.abs().sum() > 0
    torch.testing.assert_close(emd_loss(attn, target), out)  # "auto" on CPU = exact


def test_batched_sinkhorn_agrees_with_exact_emd():
    gen = torch.Generator().manual_seed(8)
    attn = _attention_like(6, 16, 16, gen).requires_grad_(True)
    target = _blobs(6, 16, 16, gen)
    exact = torch.tensor(_pot_emd(attn.detach(), target))
    approx = emd_loss(attn, target, method="sinkhorn")
    assert approx.shape == (6,)
    # Documented bias (SINKHORN_REG): above the exact EMD, by at most 2 %.
    rel = (approx.detach().double() - exact) / exact
    assert torch.all(rel > -1e-4) and torch.all(rel < 0.02), rel
    # The gradient from the dual potentials points the same way as the exact one.
    (g_sink,) = torch.autograd.grad(approx.sum(), attn)
    (g_exact,) = torch.autograd.grad(emd_loss(attn, target, method="exact").sum(), attn)
    cos = F.cosine_similarity(g_sink.flatten(1), g_exact.flatten(1), dim=1)
    assert torch.all(cos > 0.98), cos


@pytest.mark.parametrize("method", ["exact", "sinkhorn"])
def test_emd_with_zeros_is_finite(method):
    gen = torch.Generator().manual_seed(9)
    attn = _attention_like(3, 8, 8, gen)
    attn[0, :, :4] = 0  # half of the map empty
    attn[1] = 0  # nothing at all: treated as uniform
    attn[2] = _one_pixel(8, 8, 0, 0)[0]
    attn.requires_grad_(True)
    target = _blobs(3, 8, 8, gen)
    target[0, 4:] = 0
    out = emd_loss(attn, target, method=method)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(attn.grad).all()
    assert torch.all(attn.grad[1] == 0)


@pytest.mark.parametrize("method", ["exact", "sinkhorn"])
def test_emd_half_precision_is_computed_in_float32(method):
    gen = torch.Generator().manual_seed(10)
    attn = _attention_like(2, 8, 8, gen).half()
    target = _blobs(2, 8, 8, gen).half()
    out = emd_loss(attn, target, method=method)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, emd_loss(attn.float(), target.float(), method=method))


def test_emd_rejects_bad_input():
    x = torch.rand(2, 8, 8)
    with pytest.raises(ValueError, match="target"):
        emd_loss(x, torch.rand(2, 8, 7))
    with pytest.raises(ValueError, match="attn"):
        emd_loss(torch.rand(8, 8), torch.rand(8, 8))
    with pytest.raises(ValueError, match="method"):
        emd_loss(x, x, method="greedy")
    with pytest.raises(ValueError, match="reg"):
        emd_loss(x, x, method="sinkhorn", reg=0.0)
