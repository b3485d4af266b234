"""Aggregation of UNet attention probabilities into latent-resolution maps (paper §3.2, docs/fidelity.md).

Pure torch: nothing here imports diffusers, so the accumulators can be fed hand-built probabilities in tests
and benchmarks. :mod:`conceptexpress.attention.capture` feeds them from a real UNet, one layer at a time.

Both accumulators aggregate on the fly: each ``add`` folds one layer into a running sum and the layer's
probabilities can be freed right after, so memory never grows with the number of layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

Weighting = Literal["released", "diffseg"]
WEIGHTINGS: tuple[str, ...] = ("released", "diffseg")


def layer_hw(latent_hw: tuple[int, int], seq_len: int) -> tuple[int, int]:
    """Spatial shape ``(h_l, w_l)`` of a UNet layer with ``seq_len`` tokens, given the latent shape ``(h, w)``.

    Each UNet level halves the previous one with a stride-2 convolution (kernel 3, padding 1), which maps
    ``n`` to ``ceil(n / 2)``; the layer's shape is the first repeated ceil-halving of ``latent_hw`` whose area
    equals ``seq_len``. Works for non-square and odd latents, e.g. ``(16, 11) -> (8, 6) -> (4, 3)``.

    Raises:
        ValueError: when no halving of ``latent_hw`` has ``seq_len`` positions (wrong ``latent_hw``).
    """
    h, w = int(latent_hw[0]), int(latent_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"`latent_hw` must be two positive sizes, got {tuple(latent_hw)}")
    shapes = [(h, w)]
    while shapes[-1] != (1, 1):
        hh, ww = shapes[-1]
        shapes.append((math.ceil(hh / 2), math.ceil(ww / 2)))
    for shape in shapes:
        if shape[0] * shape[1] == seq_len:
            return shape
    raise ValueError(
        f"a layer with {seq_len} tokens matches no ceil-halving of `latent_hw`={tuple(latent_hw)} "
        f"(sizes {shapes}); is `latent_hw` the latent the UNet was called with?"
    )


def _check_probs(probs: torch.Tensor, hw: tuple[int, int], what: str) -> None:
    if probs.ndim != 4:
        raise ValueError(f"{what} expects probabilities of shape (B, heads, q, k), got {tuple(probs.shape)}")
    if probs.shape[2] != hw[0] * hw[1]:
        raise ValueError(
            f"{what}: `layer_hw`={tuple(hw)} has {hw[0] * hw[1]} positions but the probabilities have "
            f"{probs.shape[2]} queries"
        )


def _nearest_index(n_out: int, n_in: int, device: torch.device) -> torch.Tensor:
    # PyTorch's "nearest" rule: output i reads input floor(i * n_in / n_out).
    return (torch.arange(n_out, device=device) * n_in) // n_out  # (n_out,)


class SelfAttentionAccumulator:
    """Running aggregate of self-attention maps at latent resolution (paper §3.2, docs/fidelity.md).

    Every layer's head-averaged map ``A_l`` (``(h_l w_l) x (h_l w_l)``) is brought to ``(h w) x (h w)``:
    keys (last axis) are bilinearly resized to ``(h, w)`` (``align_corners=False``), queries (first axis) are
    repeated nearest-neighbour so that each layer query covers its block of latent positions; the result is
    weighted by ``h_l / h`` and added to one running float32 sum. :meth:`result` row-normalizes the sum.

    ``weighting="released"`` reproduces the authors' code: the bilinear upsampling multiplies each row's mass by
    about ``(h / h_l)^2``, so after the ``h_l / h`` weight a layer's effective weight is ``h / h_l`` (low
    resolutions dominate). ``weighting="diffseg"`` renormalizes each resized key map to sum 1 before the
    ``h_l / h`` weight, as DiffSeg does, so high resolutions dominate instead. For a non-square latent the weight
    is the height ratio ``h_l / h``.

    Args:
        latent_hw: latent shape ``(h, w)``.
        weighting: ``"released"`` (default) or ``"diffseg"``.
    """

    def __init__(self, latent_hw: tuple[int, int], weighting: Weighting = "released") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"`weighting` must be one of {WEIGHTINGS}, got {weighting!r}")
        h, w = int(latent_hw[0]), int(latent_hw[1])
        if h < 1 or w < 1:
            raise ValueError(f"`latent_hw` must be two positive sizes, got {tuple(latent_hw)}")
        self.latent_hw = (h, w)
        self.weighting = weighting
        self.num_layers = 0
        self._sum: torch.Tensor | None = None  # (B, h*w, h*w) float32, allocated on the first add

    @torch.no_grad()
    def add(self, probs: torch.Tensor, layer_hw: tuple[int, int]) -> None:
        """Fold one self-attention layer into the running sum.

        Args:
            probs: softmax probabilities ``(B, heads, q, k)`` with ``q = k = h_l * w_l``, rows summing to 1,
                any float dtype and device (a head axis of length 1 is fine: heads are averaged here).
            layer_hw: the layer's spatial shape ``(h_l, w_l)`` (see :func:`layer_hw`).
        """
        h_l, w_l = int(layer_hw[0]), int(layer_hw[1])
        _check_probs(probs, (h_l, w_l), "SelfAttentionAccumulator.add")
        if probs.shape[3] != h_l * w_l:
            raise ValueError(
                f"SelfAttentionAccumulator.add expects self-attention (q == k), got {tuple(probs.shape)}"
            )
        h, w = self.latent_hw
        B = probs.shape[0]
        if self._sum is None:
            self._sum = torch.zeros(B, h * w, h * w, dtype=torch.float32, device=probs.device)
        elif self._sum.shape[0] != B:
            raise ValueError(f"batch size changed between layers: {self._sum.shape[0]} then {B}")

        a = probs.detach().float().mean(dim=1)  # (B, q, k)
        # 1. keys: bilinear resize of every query's key map to the latent grid
        if (h_l, w_l) != (h, w):
            a = F.interpolate(
                a.reshape(B * h_l * w_l, 1, h_l, w_l), size=(h, w), mode="bilinear", align_corners=False
            ).reshape(B, h_l * w_l, h * w)  # (B, q, h*w)
        # 2. weights
        if self.weighting == "diffseg":
            # Bilinear upsampling inflates each row's mass by ~(h/h_l)^2: undo it so each layer weighs h_l/h.
            a = a / a.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(a.dtype).tiny)
        a = a * (h_l / h)  # (B, q, h*w)
        # 3. queries: each layer query covers a block of latent positions (nearest-neighbour repeat)
        if h % h_l == 0 and w % w_l == 0:
            # Integral factors: add through broadcasting views, no (h*w, h*w) copy of the layer map.
            rh, rw = h // h_l, w // w_l
            self._sum.view(B, h_l, rh, w_l, rw, h * w).add_(a.view(B, h_l, 1, w_l, 1, h * w))
        else:
            self._add_nearest(a, (h_l, w_l))
        self.num_layers += 1

    def _add_nearest(self, a: torch.Tensor, hw_l: tuple[int, int]) -> None:
        # Non-integral factors (odd latents): nearest index mapping, one latent row at a time so the temporary
        # is (B, w, h*w) instead of a full copy of the accumulator.
        h, w = self.latent_hw
        h_l, w_l = hw_l
        B = a.shape[0]
        rows = _nearest_index(h, h_l, a.device).tolist()
        cols = _nearest_index(w, w_l, a.device)  # (w,)
        a4 = a.view(B, h_l, w_l, h * w)
        acc4 = self._sum.view(B, h, w, h * w)
        for i, src in enumerate(rows):
            acc4[:, i].add_(a4[:, src].index_select(1, cols))  # (B, w, h*w)

    def result(self, normalize: bool = True) -> torch.Tensor:
        """The aggregated attention ``A``: float32 ``(B, h*w, h*w)``, row ``i`` = attention of latent position
        ``i`` (row-major) over all positions.

        Args:
            normalize: divide each row by its sum so that rows are distributions summing to 1 (the default and
                what clustering needs); ``False`` returns the raw weighted sum.
        """
        if self._sum is None:
            raise RuntimeError("SelfAttentionAccumulator.result() called before any layer was added")
        if not normalize:
            return self._sum.clone()
        return self._sum / self._sum.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


class CrossAttentionAccumulator:
    """Running mean over layers of the cross-attention maps of selected text tokens.

    Used for the [EOT] map of the filter (paper Eq. 5) and, with ``keep_grad=True``, for the token-attention
    alignment loss (paper Eq. 11), whose gradient must reach the attention probabilities.

    Args:
        latent_hw: latent shape ``(h, w)``; :meth:`result` is resized to it.
        token_indices: text positions to keep, either one sequence of ints shared by the batch, or a LongTensor
            ``(B, n)`` with one row of positions per batch element (prompts of different lengths).
        keep_grad: keep the autograd graph (no detach, sum in float32 through differentiable casts). The default
            detaches and works under ``torch.no_grad``.
    """

    def __init__(
        self,
        latent_hw: tuple[int, int],
        token_indices: Sequence[int] | torch.Tensor,
        keep_grad: bool = False,
    ) -> None:
        h, w = int(latent_hw[0]), int(latent_hw[1])
        if h < 1 or w < 1:
            raise ValueError(f"`latent_hw` must be two positive sizes, got {tuple(latent_hw)}")
        idx = torch.as_tensor(token_indices, dtype=torch.long)
        if idx.ndim not in (1, 2) or idx.shape[-1] == 0:
            raise ValueError(
                f"`token_indices` must be a non-empty sequence of ints or a (B, n) LongTensor, got shape "
                f"{tuple(idx.shape)}"
            )
        self.latent_hw = (h, w)
        self.token_indices = idx  # (n,) or (B, n)
        self.keep_grad = keep_grad
        self.num_layers = 0
        self._sum: torch.Tensor | None = None  # (B, q, n) float32
        self._layer_hw: tuple[int, int] | None = None

    def add(self, probs: torch.Tensor, layer_hw: tuple[int, int]) -> None:
        """Fold one cross-attention layer into the running sum.

        Args:
            probs: softmax probabilities ``(B, heads, q, n_text)`` with ``q = h_l * w_l`` (a head axis of length
                1 is fine). All layers added must share one ``layer_hw``.
            layer_hw: the layer's spatial shape ``(h_l, w_l)``.
        """
        hw = (int(layer_hw[0]), int(layer_hw[1]))
        _check_probs(probs, hw, "CrossAttentionAccumulator.add")
        if self._layer_hw is not None and hw != self._layer_hw:
            raise ValueError(
                f"CrossAttentionAccumulator mixes layer shapes {self._layer_hw} and {hw}; feed it layers of one "
                f"resolution"
            )
        B, n_text = probs.shape[0], probs.shape[3]
        idx = self.token_indices  # checked on the CPU: no device sync per layer (and it works on the meta device)
        if int(idx.max()) >= n_text or int(idx.min()) < -n_text:
            raise ValueError(f"`token_indices` {idx.tolist()} out of range for {n_text} text tokens")
        idx = idx.to(probs.device)
        if idx.ndim == 2 and idx.shape[0] != B:
            raise ValueError(f"`token_indices` has {idx.shape[0]} rows but the batch has {B} elements")
        if not self.keep_grad:
            probs = probs.detach()
        a = probs.float().mean(dim=1)  # (B, q, n_text)
        idx = idx % n_text
        idx = idx.view(1, 1, -1) if idx.ndim == 1 else idx.view(B, 1, -1)
        a = a.gather(2, idx.expand(B, a.shape[1], idx.shape[-1]))  # (B, q, n)
        # Out of place: with keep_grad the running sum is part of the autograd graph.
        self._sum = a if self._sum is None else self._sum + a
        self._layer_hw = hw
        self.num_layers += 1

    def result(self, resize: bool = True) -> torch.Tensor:
        """Layer-mean maps, bilinearly resized to the latent: float32 ``(B, n, h, w)``, unnormalized
        (probabilities, values in [0, 1]; the clustering core min-max normalizes the [EOT] map itself).
        ``resize=False`` keeps the layers' own resolution ``(B, n, h_l, w_l)`` (the EMD loss of Eq. 11 works there)."""
        if self._sum is None or self._layer_hw is None:
            raise RuntimeError("CrossAttentionAccumulator.result() called before any layer was added")
        B, _, n = self._sum.shape
        h_l, w_l = self._layer_hw
        m = (self._sum / self.num_layers).transpose(1, 2).reshape(B, n, h_l, w_l)  # (B, n, h_l, w_l)
        if resize and (h_l, w_l) != self.latent_hw:
            m = F.interpolate(m, size=self.latent_hw, mode="bilinear", align_corners=False)  # (B, n, h, w)
        return m
