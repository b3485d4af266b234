"""The sampler of ``generate``, ``extract``'s samples and ``evaluate`` (docs/fidelity.md, "Generation").

Default: the released code's sampler (``infer.py``): DDIM with ``clip_sample=False`` and ``set_alpha_to_one=False``,
50 steps, guidance 7.5, at the model's native size. It is built from the pipeline's own scheduler config, so the
training schedule (scaled_linear betas 0.00085–0.012 for SD 1.x/2.x), ``prediction_type`` (v for SD 2.1 768) and
``steps_offset`` (1: what ``StableDiffusionPipeline`` forces on the released code's explicit DDIM too) are the
model's. Other schedulers are options; :func:`describe` gives what runs record.

The caller's pipeline is never left changed: :func:`using_scheduler` swaps ``pipe.scheduler`` and restores it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import diffusers

from .config import DEFAULT_SCHEDULER, SCHEDULERS
from .errors import ConfigError

__all__ = ["DEFAULT_SCHEDULER", "SCHEDULERS", "build_scheduler", "describe", "using_scheduler"]

# name -> (diffusers class, overrides of the pipeline's config)
_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    # Released code: DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    # clip_sample=False, set_alpha_to_one=False) with num_inference_steps=50, guidance_scale=7.5.
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "pndm": ("PNDMScheduler", {}),  # SD 2.1-base's shipped scheduler
    "dpmsolver": ("DPMSolverMultistepScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
}
# "pipeline": whatever scheduler the loaded pipeline carries, unchanged (SCHEDULERS lists the names).


def _check(name: str) -> None:
    if name not in SCHEDULERS:
        raise ConfigError(f"`scheduler` must be one of {', '.join(SCHEDULERS)}, got {name!r}")


def build_scheduler(pipeline_scheduler: Any, name: str = DEFAULT_SCHEDULER) -> Any:
    """A new scheduler ``name`` made from ``pipeline_scheduler``'s config (``"pipeline"``: that scheduler itself).

    Raises:
        ConfigError: ``name`` is not one of :data:`SCHEDULERS`.
    """
    _check(name)
    if name == "pipeline":
        return pipeline_scheduler
    cls_name, overrides = _SPECS[name]
    return getattr(diffusers, cls_name).from_config(pipeline_scheduler.config, **overrides)


@contextlib.contextmanager
def using_scheduler(pipe: Any, name: str = DEFAULT_SCHEDULER) -> Iterator[Any]:
    """Sample with scheduler ``name`` inside the block; ``pipe.scheduler`` is restored afterwards, even on error."""
    original = pipe.scheduler
    pipe.scheduler = build_scheduler(original, name)
    try:
        yield pipe.scheduler
    finally:
        pipe.scheduler = original


def describe(scheduler: Any, name: str, steps: int, guidance: float) -> dict[str, Any]:
    """What a run records about its sampler: option name, class, the config entries that change the pictures."""
    config: Mapping[str, Any] = scheduler.config
    keys = ("beta_schedule", "beta_start", "beta_end", "prediction_type", "clip_sample", "set_alpha_to_one",
            "steps_offset", "timestep_spacing")
    return {
        "scheduler": name,
        "class": type(scheduler).__name__,
        "config": {k: config[k] for k in keys if k in config},
        "steps": int(steps),
        "guidance": float(guidance),
    }
