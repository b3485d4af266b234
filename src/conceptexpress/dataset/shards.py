"""Which photos this process handles: listing a folder, round-robin shards, the launcher's environment and GPU."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from ..config import ModelConfig
from ..errors import ConfigError, InputError

logger = logging.getLogger(__package__)  # "conceptexpress.dataset", as before the split

T = TypeVar("T")

# Suffixes Pillow reads on every platform; compared case-insensitively (``IMG_0001.JPG`` is common).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def list_images(folder: str | Path) -> list[Path]:
    """The photos directly inside ``folder``, sorted by file name (code-point order, the same on every machine).

    Only files whose suffix is one of :data:`IMAGE_SUFFIXES` (any case) count. The search is not recursive:
    subfolders are ignored, so a runs folder placed inside the photo folder is never mistaken for input.
    Hidden files (name starting with ``.``) are ignored too; macOS writes ``._photo.jpg`` resource forks
    next to photos on external drives and they are not images.

    Raises:
        InputError: ``folder`` is missing, is not a folder, or holds no image.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"image folder '{folder}': no such folder")
    if not folder.is_dir():
        raise InputError(f"image folder '{folder}' is not a folder")
    images = [
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    ]
    if not images:
        kinds = ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
        raise InputError(f"image folder '{folder}' holds no image ({kinds}; subfolders are not searched)")
    return sorted(images, key=lambda p: p.name)


def check_unique_stems(images: Sequence[Path]) -> None:
    """Raise when two photos would share a run folder ``RUNS/<stem>`` (``a.png`` and ``a.jpg``).

    Stems are compared case-insensitively: ``Cat.png`` and ``cat.jpg`` would share a folder on macOS and
    Windows, where a runs folder may well be copied to.
    """
    seen: dict[str, Path] = {}
    for p in images:
        key = p.stem.casefold()
        if key in seen:
            raise InputError(
                f"images '{seen[key]}' and '{p}' would share the run folder '{p.stem}'; rename one of them"
            )
        seen[key] = p


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items ``rank, rank + world_size, rank + 2·world_size, …`` (round-robin over the given order).

    Round-robin rather than contiguous blocks: sorted file names often follow capture order or category
    (``cat_001 … cat_300, dog_001 …``), and neighbouring photos tend to cost the same (size, number of
    concepts), so interleaving spreads expensive stretches over all processes and the shards never differ
    by more than one item. The assignment depends only on the list, never on timing, so every process
    computes its own shard with no communication. Every item lands in exactly one shard.

    Raises:
        ConfigError: ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.
    """
    _check_rank(rank, world_size, "rank", "world_size")
    return list(items[rank::world_size])


def _check_rank(rank: Any, world_size: Any, rank_name: str, world_name: str) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ConfigError(f"`{world_name}` must be an integer >= 1, got {world_size!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ConfigError(
            f"`{rank_name}` must be an integer in [0, {world_size}) for {world_name}={world_size}, got {rank!r}"
        )


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") from None


def _launcher_vars(env: Mapping[str, str]) -> tuple[str, str] | None:
    """The (rank, world size) variable names the launcher set, or None outside a launcher."""
    if "RANK" in env or "WORLD_SIZE" in env:
        return "RANK", "WORLD_SIZE"
    if "SLURM_PROCID" in env:
        return "SLURM_PROCID", "SLURM_NTASKS"
    return None


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process as set by its launcher, ``(0, 1)`` without one.

    ``torchrun`` and ``accelerate launch`` set ``RANK`` and ``WORLD_SIZE`` (and ``LOCAL_RANK``); Slurm's
    ``srun`` sets ``SLURM_PROCID`` and ``SLURM_NTASKS``, read only when ``RANK`` is absent (``torchrun``
    inside ``srun`` sets both, and then its own numbering is the one that counts). ``env`` defaults to
    ``os.environ``.

    Raises:
        ConfigError: a variable is not an integer, only one of a pair is set, or rank is not in
            ``[0, world_size)``.
    """
    env = os.environ if env is None else env
    names = _launcher_vars(env)
    if names is None:
        return 0, 1
    rank_name, world_name = names
    for name, other in ((rank_name, world_name), (world_name, rank_name)):
        if name not in env:
            raise ConfigError(f"environment variable {name} is missing while {other}={env[other]!r} is set")
    rank, world_size = _env_int(env, rank_name), _env_int(env, world_name)
    _check_rank(rank, world_size, rank_name, world_name)
    return rank, world_size


def local_rank_from_env(env: Mapping[str, str] | None = None) -> int:
    """This process's index on its machine: ``LOCAL_RANK`` (torchrun, accelerate), ``SLURM_LOCALID``, else 0."""
    env = os.environ if env is None else env
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if name in env:
            value = _env_int(env, name)
            if value < 0:
                raise ConfigError(f"environment variable {name} must be >= 0, got {value}")
            return value
    return 0


def process_model_config(model: ModelConfig, world_size: int, local_rank: int) -> ModelConfig:
    """``model`` with the device of this process: ``cuda:<local_rank>`` under a multi-process launch.

    With several processes per machine and ``--device auto`` or ``cuda``, every process would otherwise land
    on ``cuda:0``; launchers start one process per GPU and number them with ``LOCAL_RANK``. More processes
    than GPUs share them round-robin (with a warning). An explicit ``cuda:N``, ``cpu`` or ``mps`` is kept, and
    without CUDA (a CPU-only machine) there is nothing to place.
    """
    if world_size <= 1 or model.device not in ("auto", "cuda") or not torch.cuda.is_available():
        return model
    count = torch.cuda.device_count()
    if local_rank >= count:
        logger.warning("local rank %d but only %d CUDA devices: processes share GPUs", local_rank, count)
    device = f"cuda:{local_rank % count}"
    # Later bare "cuda" tensors (the trainer's, the library's) must land on this GPU too, not on cuda:0.
    torch.cuda.set_device(local_rank % count)
    return replace(model, device=device)
