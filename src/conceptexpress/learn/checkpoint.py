"""Atomic, resumable training checkpoints (safetensors + JSON; never pickle).

``checkpoints/step-000050.safetensors`` holds the token vectors, the AdamW moments and the random generator
state; ``checkpoints/latest.json`` names it with its SHA-256 and holds the step, the loss history and the pass
count. The JSON is written last, so a checkpoint it names is complete. The checkpoint before it is kept
(``previous.json``) for when the newest is found damaged; older tensor files are removed after the new one lands.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save

from ..errors import RunFolderError
from ..io.atomic import atomic_write_bytes, atomic_write_json
from ..io.checked import read_json_checked, read_safetensors_checked, resolve_inside

LATEST = "latest.json"
PREVIOUS = "previous.json"  # the checkpoint before LATEST, used when LATEST's files are damaged

logger = logging.getLogger(__name__)


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
    """Write ``step-NNNNNN.safetensors``, then ``latest.json`` naming it with its SHA-256.

    The checkpoint ``latest.json`` named before becomes ``previous.json`` (written before the new ``latest.json``
    lands), and its tensor file is kept: if the newest checkpoint is later found damaged, :func:`load_checkpoint`
    falls back to the one before. Tensor files named by neither are removed.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {"vectors": state.vectors.detach().float().cpu().contiguous(), "generator_state": state.generator_state}
    if state.exp_avg is not None:
        tensors["exp_avg"] = state.exp_avg.detach().float().cpu().contiguous()
        tensors["exp_avg_sq"] = state.exp_avg_sq.detach().float().cpu().contiguous()
    name = f"step-{state.step:06d}.safetensors"
    data = save(tensors)
    atomic_write_bytes(folder / name, data)
    keep = {name}
    with contextlib.suppress(RunFolderError):
        before = read_json_checked(folder / LATEST)
        if isinstance(before.get("tensors"), str) and before["tensors"] != name:
            atomic_write_json(folder / PREVIOUS, before)
    with contextlib.suppress(RunFolderError):
        # the file previous.json names stays (also when latest.json was unreadable and previous.json is older)
        previous = read_json_checked(folder / PREVIOUS)
        if isinstance(previous.get("tensors"), str):
            keep.add(previous["tensors"])
    atomic_write_json(
        folder / LATEST,
        {
            "step": state.step,
            "tensors": name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "adam_step": state.adam_step,
            "history": state.history,
            "sample_passes": state.sample_passes,
            "fingerprint": state.fingerprint,
        },
    )
    for old in folder.glob("step-*.safetensors"):
        if old.name not in keep:
            old.unlink(missing_ok=True)
    return folder / name


def _read(folder: Path, meta_name: str) -> TrainState:
    """The checkpoint ``meta_name`` (latest.json or previous.json) names, every entry checked (RunFolderError)."""
    meta_path = folder / meta_name
    meta = read_json_checked(meta_path)

    def need(key: str, kind: type | tuple[type, ...]) -> Any:
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise RunFolderError(f"{str(meta_path)!r} is damaged: {key!r} is {value!r}")
        return value

    step, history = need("step", int), need("history", list)
    adam_step, passes, fingerprint = need("adam_step", (int, float)), need("sample_passes", int), need("fingerprint", str)
    sha = meta.get("sha256")
    if sha is not None and not isinstance(sha, str):
        raise RunFolderError(f"{str(meta_path)!r} is damaged: 'sha256' is {sha!r}")
    if not all(isinstance(r, dict) for r in history):
        raise RunFolderError(f"{str(meta_path)!r} is damaged: 'history' must be a list of objects")
    path = resolve_inside(folder, meta.get("tensors"), source=meta_path)
    t = read_safetensors_checked(
        path, sha256=sha, expected={"vectors": ((None, None), torch.float32), "generator_state": ((None,), torch.uint8)},
        source=meta_path,
    )
    moments = [t.get("exp_avg"), t.get("exp_avg_sq")]
    if (moments[0] is None) != (moments[1] is None) or any(m is not None and m.shape != t["vectors"].shape for m in moments):
        raise RunFolderError(f"{str(path)!r} is damaged: the AdamW moments do not match the token vectors")
    return TrainState(
        step=step,
        vectors=t["vectors"],
        exp_avg=moments[0],
        exp_avg_sq=moments[1],
        adam_step=float(adam_step),
        generator_state=t["generator_state"],
        history=list(history),
        sample_passes=passes,
        fingerprint=fingerprint,
    )


def load_checkpoint(folder: str | Path) -> TrainState | None:
    """The latest good checkpoint in ``folder``, or None when there is none.

    A damaged newest checkpoint (``latest.json`` or its tensor file truncated, garbled, of another SHA-256, or
    naming a file outside the folder) is not used: the one before it (``previous.json``) is, or, when that is
    damaged or absent too, None (training starts over). Either way a warning names the damaged file.
    """
    folder = Path(folder)
    if not (folder / LATEST).is_file():
        return None
    try:
        return _read(folder, LATEST)
    except RunFolderError as exc:
        damaged = str(exc)
    if (folder / PREVIOUS).is_file():
        try:
            state = _read(folder, PREVIOUS)
        except RunFolderError as exc:
            logger.warning("not resuming: the latest checkpoint is unusable (%s), and so is the one before (%s); "
                           "training starts over", damaged, exc)
            return None
        logger.warning("the latest checkpoint is unusable (%s); resuming from the one before, step %d (%s)",
                       damaged, state.step, folder / PREVIOUS)
        return state
    logger.warning("not resuming: the latest checkpoint is unusable (%s) and no earlier one is kept; training "
                   "starts over", damaged)
    return None
