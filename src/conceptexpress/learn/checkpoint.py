"""Atomic, resumable training checkpoints (safetensors + JSON; never pickle).

``checkpoints/step-000050.safetensors`` holds the token vectors, the AdamW moments and the random generator
state; ``checkpoints/latest.json`` names it and holds the step, the loss history and the pass count. The JSON is
written last, so a checkpoint it names is complete; older tensor files are removed after the new one lands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from ..errors import InputError
from ..io.atomic import atomic_write_bytes, atomic_write_json

LATEST = "latest.json"


@dataclass
class TrainState:
    """Everything a step needs to continue bit-for-bit: see :class:`conceptexpress.learn.trainer.TokenTrainer`."""

    step: int
    vectors: torch.Tensor  # (K, D) float32
    exp_avg: torch.Tensor | None  # AdamW first moment (K, D), None before the first step
    exp_avg_sq: torch.Tensor | None
    adam_step: float
    generator_state: torch.Tensor  # uint8
    history: list[dict[str, Any]]
    sample_passes: int
    fingerprint: str  # config + inputs the checkpoint belongs to


def save_checkpoint(folder: str | Path, state: TrainState) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"vectors": state.vectors.detach().float().cpu().contiguous(), "generator_state": state.generator_state}
    if state.exp_avg is not None:
        tensors["exp_avg"] = state.exp_avg.detach().float().cpu().contiguous()
        tensors["exp_avg_sq"] = state.exp_avg_sq.detach().float().cpu().contiguous()
    name = f"step-{state.step:06d}.safetensors"
    atomic_write_bytes(folder / name, save(tensors))
    atomic_write_json(
        folder / LATEST,
        {
            "step": state.step,
            "tensors": name,
            "adam_step": state.adam_step,
            "history": state.history,
            "sample_passes": state.sample_passes,
            "fingerprint": state.fingerprint,
        },
    )
    for old in folder.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return folder / name


def load_checkpoint(folder: str | Path) -> TrainState | None:
    """The latest complete checkpoint in ``folder``, or None when there is none."""
    folder = Path(folder)
    meta_path = folder / LATEST
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    path = folder / meta["tensors"]
    if not path.is_file():
        raise InputError(f"checkpoint {str(meta_path)!r} names {meta['tensors']!r}, which is missing; delete the folder to restart")
    t = load_file(str(path))
    return TrainState(
        step=int(meta["step"]),
        vectors=t["vectors"],
        exp_avg=t.get("exp_avg"),
        exp_avg_sq=t.get("exp_avg_sq"),
        adam_step=float(meta["adam_step"]),
        generator_state=t["generator_state"],
        history=list(meta["history"]),
        sample_passes=int(meta["sample_passes"]),
        fingerprint=str(meta["fingerprint"]),
    )
