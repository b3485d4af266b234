"""Reading inputs and writing outputs: images (``images``), atomic writes (``atomic``), user masks (``masks``), and
the run folder (``run_folder.RunFolder``: file names, checked reads, manifest, lock, localization files)."""

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
