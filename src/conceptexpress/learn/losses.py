"""The loss terms of token learning (paper §3.3–3.4, Eq. 8, 10, 11) as pure functions on tensors.

* :func:`masked_denoising_loss` — Eq. 8, the denoising error inside a concept's latent mask.
* :func:`contrastive_loss` — Eq. 10, pulls the g split embeddings of one concept together (split phase only);
  :func:`supcon_loss` is the SupCon variant the released code optimizes instead.
* :func:`emd_loss` — Eq. 11, earth mover's distance between a token's cross-attention map and the concept's
  centroid f_i, with the Euclidean distance between pixel positions (:func:`grid_cost`) as ground cost.

The training loop combines them as Eq. 12 (split phase) and Eq. 13 (merged phase); the weights α, β, τ are the
loop's business. Nothing here imports diffusers or transformers. POT (``ot``, ≥ 0.9.6 for ``ot.batch``) is
imported by the EMD functions only, where they are called.

EMD, exact or batched: POT's exact network simplex (``ot.emd2``) takes ~7–8 ms for one 16×16 pair on CPU, so the
15 tokens of a 3-concept split step cost ~80 ms — fine beside a CPU step, too slow beside a GPU one (and a host
round trip per pair). On GPU all pairs of a step are therefore solved in one entropic call of POT's batched solver
(``ot.batch.solve_batch``, log-domain Sinkhorn, a few hundred iterations). On CPU that solver is the slower one
(~12 ms per iteration for 15 pairs, ~4.5 s to converge), hence ``method="auto"`` picks exact there. That solver is differentiable only w.r.t. the cost matrix (``grad="envelope"``) or by
backpropagating through every iteration (``grad="autodiff"``: B·n² floats kept per iteration, and NaN gradients at
empty bins through ``log(a)``). So it runs without autograd here, and the gradient w.r.t. both maps is attached
from its dual potentials (envelope theorem, as geomloss does): ∂OT_ε/∂a = f, the soft c-transform of the column
potential, finite even where a bin is empty.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SINKHORN_NUM_ITER",
    "SINKHORN_REG",
    "SINKHORN_TOL",
    "contrastive_loss",
    "emd_loss",
    "grid_cost",
    "masked_denoising_loss",
    "supcon_loss",
]

# Entropic regularization of the batched EMD, in pixel units of the ground cost (the cost is the distance between
# pixel centres, 1 between neighbours). Measured on 16×16 maps against exact ``ot.emd2`` (token-attention-like
# fields vs blob centroids, blobs vs blobs, noise vs noise; EMD 0.5–11 px): the value <M, T_ε> of the entropic plan
# lies 0.005–0.045 px above the exact EMD, ≤ 2 % of it for every pair. Smooth maps converge in 200–430 iterations;
# noise-like maps reach the 1000-iteration cap with the value already within 2 %. 0.2 px gives ~2.5 % with half
# the iterations, 0.05 px ~0.5 % with twice as many. The released code used ε = 1e-3 px with 200 iterations: there
# the marginals are far from met (row-marginal L1 error 0.7–1.9 for unit mass in POT's solver on the same maps),
# so we prefer a converged, well-defined approximation.
SINKHORN_REG = 0.1
# POT's defaults for ``solve_batch``: the row-marginal error (L2, worst pair) is checked every 10 iterations.
SINKHORN_NUM_ITER = 1000
SINKHORN_TOL = 1e-5
# A map whose total mass is at most this carries no location information: it is replaced by the uniform
# distribution (with zero gradient) instead of being divided by ~0.
_EMPTY_MAP_TOTAL = 1e-20


def _compute_dtype(t: Tensor) -> torch.dtype:
    # Half precision overflows in squared errors and exp(s/τ); float64 is kept for reference computations.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------------------
# Eq. 8: masked denoising loss
# --------------------------------------------------------------------------------------------------------------


def masked_denoising_loss(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Masked ε-prediction error of paper Eq. 8, one value per sample.

    ``L = mean over (C, h, w) of ((pred − target) ⊙ m)²`` — the mean runs over *all* C·h·w latent elements, not
    over the mask area: α and β of Eq. 12–13 were tuned with this normalization, and it is what the released code
    computes (``F.mse_loss(pred * mask, target * mask, reduction="mean")`` per prompt). A small concept thus
    contributes a small loss.

    Args:
        pred: (B, C, h, w) UNet prediction, any float dtype.
        target: (B, C, h, w) denoising target (ε, or v for v-prediction models), same shape as ``pred``.
        mask: (B, h, w) or (B, 1, h, w) latent mask in {0, 1}, float or bool, broadcast over channels. For a
            prompt with several concepts, pass the union of their masks. Soft values are accepted and weight the
            squared error by m².

    Returns:
        (B,) loss per sample, float32 (float64 if ``pred`` is float64); differentiable w.r.t. ``pred``.
    """
    if not isinstance(pred, Tensor) or not isinstance(target, Tensor) or not isinstance(mask, Tensor):
        raise TypeError("`pred`, `target` and `mask` must be torch.Tensor")
    if pred.ndim != 4:
        raise ValueError(f"`pred` must be (B, C, h, w), got shape {tuple(pred.shape)}")
    if target.shape != pred.shape:
        raise ValueError(
            f"`target` must have the shape of `pred` {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    b, _, h, w = pred.shape
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.shape != (b, h, w):
        raise ValueError(
            f"`mask` must be (B, h, w) = {(b, h, w)} or (B, 1, h, w) for `pred` of shape {tuple(pred.shape)}, "
            f"got {tuple(mask.shape)}"
        )
    dtype = _compute_dtype(pred)
    m = mask.to(device=pred.device, dtype=dtype).unsqueeze(1)  # (B, 1, h, w)
    err = (pred.to(dtype) - target.to(dtype)) * m  # (B, C, h, w)
    return err.square().mean(dim=(1, 2, 3))  # (B,)


# --------------------------------------------------------------------------------------------------------------
# Eq. 10: contrastive loss between split tokens
# --------------------------------------------------------------------------------------------------------------


def _similarities(embeddings: Tensor, labels: Tensor, tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """Validated cosine similarities / τ (M, M), the positive mask (M, M) and the self mask (M, M)."""
    if not isinstance(embeddings, Tensor) or not isinstance(labels, Tensor):
        raise TypeError("`embeddings` and `labels` must be torch.Tensor")
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"`embeddings` must be (M, D) with M ≥ 2, got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        raise ValueError(f"`embeddings` must be a floating-point tensor, got dtype {embeddings.dtype}")
    m = embeddings.shape[0]
    if labels.shape != (m,):
        raise ValueError(
            f"`labels` must be ({m},), one concept id per embedding, got shape {tuple(labels.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"`tau` must be > 0, got {tau}")
    labels = labels.to(embeddings.device)
    eye = torch.eye(m, dtype=torch.bool, device=embeddings.device)  # (M, M)
    pos = (labels[:, None] == labels[None, :]) & ~eye  # (M, M) same concept, other token
    lonely = (~pos.any(dim=1)).nonzero().flatten()
    if lonely.numel() > 0:
        raise ValueError(
            f"every label needs at least two embeddings (a positive pair); label(s) "
            f"{sorted(set(labels[lonely].tolist()))} occur once"
        )
    v = F.normalize(embeddings.to(_compute_dtype(embeddings)), dim=-1)  # (M, D), unit rows
    sim = v @ v.T / tau  # (M, M) in [-1/τ, 1/τ]
    return sim, pos, eye


def contrastive_loss(embeddings: Tensor, labels: Tensor, tau: float = 0.07) -> Tensor:
    """Per-anchor contrastive loss of paper Eq. 10 on the M = g·N split-token embeddings.

    For anchor j with unit vector v_j (rows are L2-normalized here) and s_jq = v_j·v_q / τ::

        L_j = −(1/M) · log( Σ_{q≠j, label q = label j} exp(s_jq) / Σ_{q≠j} exp(s_jq) )

    i.e. minus the log of the softmax mass the anchor puts on its own concept, computed with two logsumexps.
    Its gradient pulls the g embeddings of a concept together and pushes other concepts away.

    Args:
        embeddings: (M, D) float embeddings v_i^j, any order; need not be normalized.
        labels: (M,) concept id of each row (e.g. ``arange(M) % N``); every id must occur at least twice.
        tau: temperature τ > 0 (paper: 0.07).

    Returns:
        (M,) L_j per anchor, float32 (float64 for float64 input). Its sum is the paper's Σ_{i,j} L^con_{i,j};
        Eq. 12 averages that sum once more with 1/(g·N).

    Raises:
        ValueError: on bad shapes, τ ≤ 0, or a label with a single member (no positive).
    """
    sim, pos, eye = _similarities(embeddings, labels, tau)
    m = sim.shape[0]
    log_all = torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1)  # (M,) all q ≠ j
    log_pos = torch.logsumexp(sim.masked_fill(~pos, float("-inf")), dim=1)  # (M,) positives only
    return -(log_pos - log_all) / m  # (M,)


def supcon_loss(embeddings: Tensor, labels: Tensor, tau: float = 0.07) -> Tensor:
    """Supervised contrastive loss as the released code optimizes it (Khosla et al. 2020, "L_out").

    ``L = −mean_j [ mean_{p ∈ P(j)} log( exp(s_jp) / Σ_{q≠j} exp(s_jq) ) ]`` with s = cosine / τ and P(j) the
    other rows of j's label; the released ``SupConLoss`` scales by temperature / base_temperature = 1.

    Difference to Eq. 10 (:func:`contrastive_loss`): Eq. 10 takes the log of the *summed* softmax mass of the
    positives (Khosla's "L_in", without the 1/|P| inside the log) and scales each anchor by 1/M; SupCon averages
    the *log* of each positive's softmax probability. By Jensen, per anchor ``L_out ≥ M·L_j + log|P|`` with
    equality iff all positives get the same probability; with one positive per anchor (g = 2) the two coincide,
    ``supcon_loss == contrastive_loss(...).sum()``. In the gradients, L_out pulls every positive with the same
    weight 1/|P|, whereas L_in weights each positive by its share of the positive mass, favouring the closest.

    Args:
        embeddings: (M, D) float embeddings; rows are L2-normalized here.
        labels: (M,) concept id per row; every id must occur at least twice.
        tau: temperature τ > 0 (released code: 0.07).

    Returns:
        Scalar loss, float32 (float64 for float64 input).
    """
    sim, pos, eye = _similarities(embeddings, labels, tau)
    log_all = torch.logsumexp(sim.masked_fill(eye, float("-inf")), dim=1, keepdim=True)  # (M, 1)
    log_prob = sim - log_all  # (M, M); the diagonal is finite and masked out below
    mean_pos = torch.where(pos, log_prob, torch.zeros_like(log_prob)).sum(1) / pos.sum(1)  # (M,)
    return -mean_pos.mean()


# --------------------------------------------------------------------------------------------------------------
# Eq. 11: EMD between a token's cross-attention and the concept centroid
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _grid_cost_cached(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")  # (h, w) each
    pts = torch.stack([ys.flatten(), xs.flatten()], dim=1).to(torch.float64)  # (h·w, 2), row-major
    # Explicit differences rather than torch.cdist: its matmul path leaves ~1e-4 errors and a non-zero diagonal.
    cost = (pts[:, None, :] - pts[None, :, :]).square().sum(-1).sqrt()  # (h·w, h·w)
    return cost.to(device=device, dtype=dtype)


def grid_cost(
    h: int, w: int, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Ground cost of Eq. 11: Euclidean distance between the pixel centres of an h×w grid, in pixels.

    Pixels are flattened row-major (index y·w + x), like ``map.flatten()`` of an (h, w) map.

    Args:
        h, w: grid size (≥ 1).
        device, dtype: where and in which precision to return it (default CPU float32).

    Returns:
        (h·w, h·w) symmetric matrix with zero diagonal, e.g. 5.0 between pixels (1, 2) and (4, 6). Cached per
        (h, w, device, dtype): the same tensor is returned each time, so never modify it in place.
    """
    if int(h) < 1 or int(w) < 1:
        raise ValueError(f"`h` and `w` must be ≥ 1, got {h}×{w}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _grid_cost_cached(int(h), int(w), dev, dtype)


def _check_maps(x: Tensor, name: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 3:
        raise ValueError(f"`{name}` must be (B, h, w), one map per pair, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got dtype {x.dtype}")


def _as_distributions(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(B, h, w) non-negative maps -> (B, h·w) distributions summing to 1 (uniform where a map is empty)."""
    # Negative values can only come from resampling artefacts (e.g. bicubic resize); they are not mass.
    x = x.to(dtype).flatten(1).clamp_min(0)  # (B, n)
    total = x.sum(dim=1, keepdim=True)  # (B, 1)
    valid = total > _EMPTY_MAP_TOTAL
    # Divide by 1 where invalid so that the unused branch of `where` has no 0/0 to backpropagate through.
    safe = torch.where(valid, total, torch.ones_like(total))  # (B, 1)
    uniform = torch.full_like(x, 1.0 / x.shape[1])  # (B, n)
    return torch.where(valid, x / safe, uniform)  # (B, n)


def emd_loss(
    attn: Tensor,
    target: Tensor,
    *,
    method: str = "auto",
    reg: float = SINKHORN_REG,
    num_iter: int = SINKHORN_NUM_ITER,
    tol: float = SINKHORN_TOL,
) -> Tensor:
    """Location-aware EMD regularization of paper Eq. 11, one value per (token map, centroid) pair.

    Both maps are normalized to sum 1 inside, then compared with the optimal-transport cost under the Euclidean
    ground cost between pixel positions (:func:`grid_cost`), so the value is in pixels: the average distance
    attention mass must travel to match the centroid.

    Args:
        attn: (B, h, w) cross-attention map of each token (non-negative; typically has gradient). Any float
            dtype; half precision is computed in float32.
        target: (B, h, w) centroid f_i of the token's concept resized to h×w (non-negative; usually no gradient).
        method: ``"exact"``: POT's network simplex ``ot.emd2`` per pair, gradient = its centred dual potentials
            (a subgradient); meant for the small latent/4 maps (16×16 at 512 px), its cost grows with (h·w)²; ``"sinkhorn"``: all B pairs in one call of POT's batched log-domain Sinkhorn with
            entropic regularization ``reg``, gradient from its dual potentials; ``"auto"``: exact on CPU,
            sinkhorn on any accelerator (where exact EMD would mean B host round trips of ~8 ms each).
        reg: entropic regularization ε in pixel units (sinkhorn only). The default 0.1 keeps the value within
            2 % (≤ 0.05 px) of the exact EMD on 16×16 maps, above it once converged: the entropic plan is
            feasible but blurred (see ``SINKHORN_REG``).
        num_iter: maximum Sinkhorn iterations (sinkhorn only).
        tol: stop once the worst pair's row-marginal error (L2) is below this (sinkhorn only).

    Returns:
        (B,) EMD per pair in pixels, float32 (float64 for float64 input), on ``attn``'s device; differentiable
        w.r.t. ``attn`` and ``target``. A map with (almost) no mass is treated as uniform, with zero gradient;
        negative entries are clamped to 0.

    Raises:
        ValueError: on mismatched or non-(B, h, w) shapes, an unknown ``method``, or non-positive ``reg``/``num_iter``.
    """
    _check_maps(attn, "attn")
    _check_maps(target, "target")
    if target.shape != attn.shape:
        raise ValueError(
            f"`target` must have the shape of `attn` {tuple(attn.shape)}, got {tuple(target.shape)}"
        )
    if method not in ("auto", "exact", "sinkhorn"):
        raise ValueError(f"`method` must be 'auto', 'exact' or 'sinkhorn', got {method!r}")
    if not reg > 0:
        raise ValueError(f"`reg` must be > 0, got {reg}")
    if int(num_iter) < 1:
        raise ValueError(f"`num_iter` must be ≥ 1, got {num_iter}")
    if method == "auto":
        method = "exact" if attn.device.type == "cpu" else "sinkhorn"
    out_dtype = _compute_dtype(attn)
    b, h, w = attn.shape
    target = target.to(attn.device)
    if b == 0:
        return attn.new_zeros(0, dtype=out_dtype)
    if method == "exact":
        # The network simplex runs in float64 on the host anyway, and POT checks that both marginals sum to
        # the same total to 6 decimals, which float32 normalization can miss.
        a = _as_distributions(attn, torch.float64)  # (B, n)
        t = _as_distributions(target, torch.float64)  # (B, n)
        cost = grid_cost(h, w, device=attn.device, dtype=torch.float64)  # (n, n)
        return _emd_exact(a, t, cost).to(out_dtype)  # (B,)
    a = _as_distributions(attn, out_dtype)  # (B, n)
    t = _as_distributions(target, out_dtype)  # (B, n)
    cost = grid_cost(h, w, device=attn.device, dtype=out_dtype)  # (n, n)
    return _emd_sinkhorn(a, t, cost, reg=float(reg), num_iter=int(num_iter), tol=float(tol))  # (B,)


def _emd_exact(a: Tensor, b: Tensor, cost: Tensor) -> Tensor:
    """Exact EMD per pair with POT; a, b (B, n) float64 distributions, cost (n, n) -> (B,) with POT's gradients."""
    import ot  # lazy: POT takes seconds to import and only the EMD term needs it

    # ot.emd2 on torch tensors registers ∂/∂a = u − mean(u), ∂/∂b = v − mean(v) (dual potentials, with
    # finite values estimated for empty bins) and ∂/∂M = the plan.
    return torch.stack([ot.emd2(a[i], b[i], cost) for i in range(a.shape[0])])  # (B,)


def _emd_sinkhorn(a: Tensor, b: Tensor, cost: Tensor, *, reg: float, num_iter: int, tol: float) -> Tensor:
    """Entropic EMD of all pairs in one batched POT call; a, b (B, n), cost (n, n) -> (B,)."""
    from ot.batch import solve_batch  # lazy, as in _emd_exact

    bsz, n = a.shape
    with torch.no_grad():
        res = solve_batch(
            cost.expand(bsz, n, n),
            reg=reg,
            a=a.detach(),
            b=b.detach(),
            max_iter=num_iter,
            tol=tol,
            method="log_sinkhorn",
            grad="detach",
        )
        # Report the transport cost of the entropic plan, <M, T_ε>: an upper bound of the exact EMD that tends
        # to it as ε → 0 (the regularized objective itself is shifted by −ε·H(T), ~1 px here).
        value = res.value_linear  # (B,)
        log_u, log_v = res.potentials  # (B, n) each: T = exp(−M/ε + log_u ⊕ log_v)
        neg_k = cost / -reg  # (n, n)
        # Dual potentials of OT_ε measured against a ⊗ b: f_i = −ε·LSE_j(−M_ij/ε + log_v_j), the soft
        # c-transform, finite at empty bins (log_u itself is −inf there). ∂OT_ε/∂a = f, ∂OT_ε/∂b = g.
        f = -reg * torch.logsumexp(neg_k.unsqueeze(0) + log_v.unsqueeze(1), dim=2)  # (B, n)
        g = -reg * torch.logsumexp(neg_k.unsqueeze(0) + log_u.unsqueeze(2), dim=1)  # (B, n)
        # Constants do not matter on the simplex; centring them mirrors ot.emd2's gradients.
        f = f - f.mean(dim=1, keepdim=True)
        g = g - g.mean(dim=1, keepdim=True)
    # Envelope theorem: the value is a constant in the graph, the linear terms carry the gradient.
    return value + (f * (a - a.detach())).sum(1) + (g * (b - b.detach())).sum(1)  # (B,)
