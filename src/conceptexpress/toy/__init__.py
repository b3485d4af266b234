"""The toy world: procedural scenes with known answers and a small Stable Diffusion trained on them (docs/toy-world.md)."""

from .reader import read_objects
from .shipped import toy_pipeline_path
from .world import COLORS, IMAGE_SIZE, SHAPES, ToyScene, caption_for, render_scene

__all__ = [
    "COLORS",
    "IMAGE_SIZE",
    "SHAPES",
    "ToyScene",
    "caption_for",
    "read_objects",
    "render_scene",
    "toy_pipeline_path",
]
