"""Base-model loading and text-side helpers (thin adapters around diffusers and transformers)."""

from .loading import load_pipeline, resolve_device, resolve_dtype

__all__ = ["load_pipeline", "resolve_device", "resolve_dtype"]
