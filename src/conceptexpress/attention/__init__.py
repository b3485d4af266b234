"""Attention capture and aggregation (paper §3.2).

``aggregate`` is pure torch and imports without diffusers; ``capture`` (the diffusers processors) is loaded
on first use of one of its names.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .aggregate import WEIGHTINGS, CrossAttentionAccumulator, SelfAttentionAccumulator, layer_hw

if TYPE_CHECKING:
    from .capture import CapturingAttnProcessor, attention_levels, capture_attention

_CAPTURE_NAMES = ("CapturingAttnProcessor", "attention_levels", "capture_attention")

__all__ = [
    "WEIGHTINGS",
    "CrossAttentionAccumulator",
    "SelfAttentionAccumulator",
    "layer_hw",
    "CapturingAttnProcessor",
    "attention_levels",
    "capture_attention",
]


def __getattr__(name: str) -> Any:
    # Lazy: importing the pure aggregation must not pull diffusers in.
    if name in _CAPTURE_NAMES:
        from . import capture

        return getattr(capture, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
