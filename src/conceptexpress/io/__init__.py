"""Reading inputs and writing outputs: image loading and sizing (``images``), atomic file writes (``atomic``)."""

from __future__ import annotations

from conceptexpress.io.atomic import (
    atomic_save_image,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    ensure_output_dir,
)
from conceptexpress.io.images import (
    image_to_tensor,
    load_image,
    model_input_size,
    to_rgb,
    upsample_masks,
)

__all__ = [
    "atomic_save_image",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "ensure_output_dir",
    "image_to_tensor",
    "load_image",
    "model_input_size",
    "to_rgb",
    "upsample_masks",
]
