"""Attention capture through diffusers attention processors (docs/fidelity.md, "Concept localization" and "Token learning").

:func:`capture_attention` swaps a :class:`CapturingAttnProcessor` onto exactly the UNet layers that feed an
accumulator (every self-attention layer for the localization map, the cross-attention layers at latent/4 for
the [EOT] map and the alignment loss), leaves every other layer on its own processor, and restores the
original processors with ``unet.set_attn_processor`` on exit, also when the body raises.

    >>> sa = SelfAttentionAccumulator(latent_hw)
    >>> with torch.no_grad(), capture_attention(unet, latent_hw, self_attention=sa):
    ...     unet(latents, t, encoder_hidden_states=text_emb)
    >>> A = sa.result()                                                   # (B, h*w, h*w)

Gradient checkpointing. diffusers checkpoints transformer blocks with ``torch.utils.checkpoint`` and
``use_reentrant=False``: the forward runs with autograd on (captured probabilities keep their graph), and during
``backward`` the blocks are run again to recompute dropped activations. Two things keep that correct:

1. A processor only hands probabilities to its sink while the UNet's own ``forward`` is running (forward
   pre-/post-hooks on the UNet keep a depth counter). The recomputation happens inside ``backward``, outside
   any UNet forward, so it computes the attention output as usual but adds nothing: no double counting.
2. The sink runs under identity ``saved_tensors_hooks``, so tensors it saves for backward are kept as they are
   instead of being packed by the checkpoint. The checkpoint therefore sees the same sequence of saved tensors
   in the forward and in the recomputation (which skips the sink), as its non-reentrant mode requires.
3. The recomputation calls whatever processor is installed when ``backward`` runs, and must match the forward:
   call ``backward`` inside the ``with`` block (a warning is logged when a checkpointed forward with autograd
   leaves the block with no recomputation seen).

A reentrant checkpoint (``use_reentrant=True``, only through a custom ``gradient_checkpointing_func``) runs
blocks under ``torch.no_grad`` and would silently drop the gradient of a ``keep_grad`` cross-attention
accumulator, the failure of the released code; that case raises instead.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from .aggregate import CrossAttentionAccumulator, SelfAttentionAccumulator, layer_hw

logger = logging.getLogger(__name__)

# A sink receives one layer's probabilities (B, heads, q, k) and the layer's spatial shape (h_l, w_l).
Sink = Callable[[torch.Tensor, tuple[int, int]], None]

# Processors whose output CapturingAttnProcessor reproduces; replacing any other one changes the model.
_EQUIVALENT = (AttnProcessor, AttnProcessor2_0)


class CapturingAttnProcessor:
    """Attention processor equal to diffusers' ``AttnProcessor2_0`` that also hands out its probabilities.

    The softmax probabilities are materialized explicitly (``scale = attn.scale``; ``attn.upcast_attention``
    and ``attn.upcast_softmax`` are respected like diffusers' ``get_attention_scores``; an additive float or a
    boolean ``attention_mask`` is applied like ``scaled_dot_product_attention``) and passed to ``sink`` as
    ``(B, heads, q, k)``, together with the layer's spatial shape found from the query token count by
    :func:`~conceptexpress.attention.aggregate.layer_hw`. Residual, group norm, spatial norm, ``norm_cross``,
    ``norm_q/k``, ``to_out`` and ``rescale_output_factor`` are handled as in ``AttnProcessor2_0``.

    Args:
        sink: called as ``sink(probs, (h_l, w_l))``; ``probs`` is in the softmax dtype (float32 when upcast)
            and carries the autograd graph when grad is enabled.
        latent_hw: the latent shape ``(h, w)`` the UNet is called with.
        head_chunk: compute attention for this many heads at a time, to keep peak memory at one chunk of
            probabilities plus their running head sum (large images). ``None`` (default) computes all heads at
            once and the sink sees every head; when chunked, the sink receives the head mean as a head axis of
            length 1 (the accumulators average heads, so their results are the same).
        enabled: zero-argument callable deciding, at each call, whether probabilities go to the sink; the
            output is computed either way. ``None`` = always.
        expected_hw: if given, the layer shape this processor must see; a mismatch raises (internal check that
            the static layer selection agrees with the running model).
        require_grad: raise if the sink would receive probabilities without autograd while the UNet was called
            with grad enabled (a reentrant checkpoint).
    """

    def __init__(
        self,
        sink: Sink,
        latent_hw: tuple[int, int],
        *,
        head_chunk: int | None = None,
        enabled: Callable[[], bool] | None = None,
        expected_hw: tuple[int, int] | None = None,
        require_grad: Callable[[], bool] | None = None,
    ) -> None:
        if head_chunk is not None and head_chunk < 1:
            raise ValueError(f"`head_chunk` must be a positive int or None, got {head_chunk}")
        self.sink = sink
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.head_chunk = head_chunk
        self.enabled = enabled
        self.expected_hw = expected_hw
        self.require_grad = require_grad

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        shape4d = hidden_states.shape if hidden_states.ndim == 4 else None
        if shape4d is not None:
            b, c, h, w = shape4d
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)

        query, key, value, attention_mask = self._heads(attn, hidden_states, encoder_hidden_states, attention_mask)
        capture = self.enabled is None or self.enabled()
        hw = self._checked_hw(query.shape[2]) if capture else None
        hidden_states = self._attend(attn, query, key, value, attention_mask, hw)  # (B, heads, q, d)

        batch_size, heads, _, head_dim = hidden_states.shape
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)  # linear proj
        hidden_states = attn.to_out[1](hidden_states)  # dropout
        if shape4d is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(shape4d)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    @staticmethod
    def _heads(
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Query, key and value as ``(B, heads, tokens, d)`` and the mask as ``(B, heads, 1 or q, k)``, as
        ``AttnProcessor2_0`` prepares them (mask, group norm, ``norm_cross``, ``norm_q/k``)."""
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (B, q, inner)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)  # (B, k, inner)
        value = attn.to_v(encoder_hidden_states)  # (B, k, inner)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        return query, key, value, attention_mask

    def _checked_hw(self, num_queries: int) -> tuple[int, int]:
        """The layer's spatial shape, checked against ``expected_hw`` and ``require_grad``."""
        hw = layer_hw(self.latent_hw, num_queries)
        if self.expected_hw is not None and hw != tuple(self.expected_hw):
            raise RuntimeError(
                f"capturing processor expected a layer of shape {self.expected_hw} but got {hw} "
                f"({num_queries} tokens, latent {self.latent_hw})"
            )
        if self.require_grad is not None and self.require_grad() and not torch.is_grad_enabled():
            raise RuntimeError(
                "cross-attention probabilities are captured with keep_grad=True but this layer runs without "
                "autograd although the UNet was called with grad enabled: a reentrant gradient checkpoint "
                "(use_reentrant=True) would silently drop their gradient; use unet.enable_gradient_checkpointing() "
                "without a custom function (non-reentrant)"
            )
        return hw

    def _attend(
        self,
        attn: Attention,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        hw: tuple[int, int] | None,
    ) -> torch.Tensor:
        """Attention output ``(B, heads, q, d)``, ``head_chunk`` heads at a time; the probabilities go to the
        sink when ``hw`` is given (all heads, or their mean when chunked)."""
        heads = attn.heads
        chunk = heads if self.head_chunk is None else min(self.head_chunk, heads)
        outs = []
        head_sum = None
        for start in range(0, heads, chunk):
            sl = slice(start, start + chunk)
            mask = None if attention_mask is None else attention_mask[:, sl]  # (B, c, 1 or q, k)
            probs = self._probs(attn, query[:, sl], key[:, sl], mask)  # (B, c, q, k)
            outs.append(probs.to(value.dtype) @ value[:, sl])  # (B, c, q, d)
            if hw is None:
                continue
            if chunk == heads:
                self._to_sink(probs, hw)
            else:
                s = probs.sum(dim=1, keepdim=True)  # (B, 1, q, k)
                head_sum = s if head_sum is None else head_sum + s
        if head_sum is not None:
            self._to_sink(head_sum / heads, hw)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    @staticmethod
    def _probs(
        attn: Attention, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        # Same numerics as diffusers' Attention.get_attention_scores, with SDPA's mask semantics.
        if attn.upcast_attention:
            query, key = query.float(), key.float()
        # Scale before the product (as SDPA does) so that half-precision scores do not overflow.
        scores = (query * attn.scale) @ key.transpose(-1, -2)  # (B, c, q, k)
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = scores.masked_fill(~mask, float("-inf"))
            else:
                scores = scores + mask.to(scores.dtype)
        if attn.upcast_softmax:
            scores = scores.float()
        return scores.softmax(dim=-1)  # (B, c, q, k)

    def _to_sink(self, probs: torch.Tensor, hw: tuple[int, int] | None) -> None:
        assert hw is not None
        # Identity hooks: whatever the sink saves for backward bypasses an enclosing non-reentrant checkpoint,
        # which must see the same saved tensors when it recomputes this block without the sink.
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            self.sink(probs, hw)


def _halve(hw: tuple[int, int], times: int) -> tuple[int, int]:
    h, w = hw
    for _ in range(times):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    return h, w


def attention_levels(unet: torch.nn.Module) -> dict[str, int]:
    """Number of resolution halvings below the latent for every attention layer of a UNet2DConditionModel.

    Read from the model: down blocks descend one level after each block with ``downsamplers``, the mid block sits
    at the lowest level, up blocks climb one level after each block with ``upsamplers``. Keys are processor names
    as in ``unet.attn_processors`` (``"down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor"``).
    """
    levels: dict[str, int] = {}

    def collect(prefix: str, block: torch.nn.Module, level: int) -> None:
        for name, module in block.named_modules():
            if isinstance(module, Attention):
                levels[f"{prefix}.{name}.processor"] = level

    level = 0
    for i, block in enumerate(getattr(unet, "down_blocks", [])):
        collect(f"down_blocks.{i}", block, level)
        if getattr(block, "downsamplers", None) is not None:
            level += 1
    if getattr(unet, "mid_block", None) is not None:
        collect("mid_block", unet.mid_block, level)
    for i, block in enumerate(getattr(unet, "up_blocks", [])):
        collect(f"up_blocks.{i}", block, level)
        if getattr(block, "upsamplers", None) is not None:
            level -= 1
    return levels


@dataclass
class _ForwardGate:
    """Tracks whether the UNet's own forward is running (not a checkpoint recomputation inside backward)."""

    depth: int = 0
    grad_at_entry: bool = False  # autograd state when the outermost UNet forward began
    forward_with_grad: bool = False  # some UNet forward ran with autograd on
    recomputed: bool = False  # a processor ran outside any UNet forward with autograd on (a recomputation)

    def pre(self, module, args, kwargs=None) -> None:
        if self.depth == 0:
            self.grad_at_entry = torch.is_grad_enabled()
            self.forward_with_grad |= self.grad_at_entry
        self.depth += 1

    def post(self, module, args, output) -> None:
        self.depth = max(self.depth - 1, 0)

    def open(self) -> bool:
        if self.depth > 0:
            return True
        self.recomputed |= torch.is_grad_enabled()
        return False


def _cross_layers_at(unet, modules: dict, latent_hw: tuple[int, int], target: tuple[int, int], downsample: int) -> list[str]:
    """Processor names of the cross-attention layers at spatial shape ``target``; raises if there are none."""
    levels = attention_levels(unet)
    at = {k: _halve(latent_hw, levels[k]) for k, m in modules.items() if m.is_cross_attention and k in levels}
    chosen = [k for k, hw in at.items() if hw == target]
    if not chosen:
        raise ValueError(
            f"no cross-attention layer at latent/{downsample} = {target} for `latent_hw`={latent_hw}; "
            f"the UNet has cross-attention at {sorted(set(at.values()))}"
        )
    return chosen


@contextmanager
def capture_attention(
    unet: torch.nn.Module,
    latent_hw: tuple[int, int],
    *,
    self_attention: SelfAttentionAccumulator | None = None,
    cross_attention: CrossAttentionAccumulator | None = None,
    cross_downsample: int = 4,
    head_chunk: int | None = None,
) -> Iterator[dict[str, CapturingAttnProcessor]]:
    """Feed a UNet's attention probabilities into accumulators for the duration of a ``with`` block.

    Self-attention: every self-attention layer (``attn1``) goes to ``self_attention``. Cross-attention: the
    cross-attention layers (``attn2``) at the level ``cross_downsample`` times below the latent (latent/4 =
    16 x 16 for SD at 512 px; the level is ``latent_hw`` ceil-halved ``log2(cross_downsample)`` times) go to
    ``cross_attention``. Only those layers get a :class:`CapturingAttnProcessor`; all others keep their
    processor. The originals are restored on exit, also on exceptions. Each layer's resolution is found at call
    time from its token count, so any image size works as long as ``latent_hw`` is the latent actually fed.

    Args:
        unet: a diffusers ``UNet2DConditionModel`` (SD 1.x / 2.x layout).
        latent_hw: latent shape ``(h, w)`` = image size / VAE factor.
        self_attention: accumulator for the self-attention layers, or ``None``.
        cross_attention: accumulator for the cross-attention layers at latent/``cross_downsample``, or ``None``.
        cross_downsample: power of two; 4 as in the paper.
        head_chunk: see :class:`CapturingAttnProcessor` (``None`` = all heads at once).

    Yields:
        The installed processors by processor name.

    Raises:
        ValueError: ``cross_downsample`` not a power of two, or no cross-attention layer at that level.
    """
    latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
    if cross_downsample < 1 or cross_downsample & (cross_downsample - 1):
        raise ValueError(f"`cross_downsample` must be a power of two, got {cross_downsample}")
    original = dict(unet.attn_processors)
    modules = {f"{name}.processor": m for name, m in unet.named_modules() if isinstance(m, Attention)}
    gate = _ForwardGate()

    installed: dict[str, CapturingAttnProcessor] = {}
    if self_attention is not None:
        for key in (k for k, m in modules.items() if not m.is_cross_attention):
            installed[key] = CapturingAttnProcessor(self_attention.add, latent_hw, head_chunk=head_chunk, enabled=gate.open)
    if cross_attention is not None:
        target = _halve(latent_hw, int(math.log2(cross_downsample)))
        require = (lambda: gate.grad_at_entry) if cross_attention.keep_grad else None
        for key in _cross_layers_at(unet, modules, latent_hw, target, cross_downsample):
            installed[key] = CapturingAttnProcessor(
                cross_attention.add, latent_hw, head_chunk=head_chunk, enabled=gate.open, expected_hw=target,
                require_grad=require,
            )
    for key in installed:
        if not isinstance(original[key], _EQUIVALENT):
            logger.warning(
                "capture_attention replaces %s on %s by plain attention for the duration of the capture",
                type(original[key]).__name__,
                key,
            )

    hooks = [
        unet.register_forward_pre_hook(gate.pre, with_kwargs=True),
        unet.register_forward_hook(gate.post, always_call=True),
    ]
    try:
        # set_attn_processor pops from the dict it is given: hand it copies.
        unet.set_attn_processor({**original, **installed})
        yield installed
        if (
            getattr(unet, "is_gradient_checkpointing", False)
            and gate.forward_with_grad
            and not gate.recomputed
        ):
            # The checkpoint would recompute the blocks with the restored processors, which save other tensors.
            logger.warning(
                "capture_attention exits after a forward with autograd and gradient checkpointing but before "
                "backward: call backward inside the `with` block, or backward will fail with a CheckpointError"
            )
    finally:
        for h in hooks:
            h.remove()
        unet.set_attn_processor(dict(original))
