"""Base-model loading and text-side helpers (thin adapters around diffusers and transformers).

``load_pipeline`` and friends (diffusers) are loaded on first use, so that ``models.hf`` (the transformers
encoders of evaluation and MaskCut) and ``models.family`` import without diffusers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .loading import load_pipeline, resolve_device, resolve_dtype

_LOADING_NAMES = ("load_pipeline", "resolve_device", "resolve_dtype")

__all__ = ["load_pipeline", "resolve_device", "resolve_dtype"]


def __getattr__(name: str) -> Any:
    # Lazy: importing a sibling (`models.hf`, `models.family`) must not pull diffusers in.
    if name in _LOADING_NAMES:
        from . import loading

        return getattr(loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
