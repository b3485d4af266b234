"""Checked reads of a run folder's files: every path and tensor file a run's JSON names is checked before use.

A path in a JSON file is resolved with :func:`resolve_inside` (never outside the folder); a tensor file is read
with :func:`read_safetensors_checked` (SHA-256 recorded by the JSON that names it, header, names, shapes,
dtypes); a JSON file with :func:`read_json_checked`. A file that fails raises
:class:`~conceptexpress.errors.RunFolderError` naming it (docs/inputs.md, "Run-folder guarantees"). Used by
:class:`~conceptexpress.io.run_folder.RunFolder` and by every reader of files inside a run (checkpoints, token
files). Nothing here knows the run folder's file names.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..errors import RunFolderError

__all__ = ["file_sha256", "read_json_checked", "read_safetensors_checked", "resolve_inside"]


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def resolve_inside(run_dir: str | Path, rel: Any, *, source: str | Path) -> Path:
    """``run_dir / rel`` resolved, refused unless it lies inside ``run_dir``.

    ``rel`` comes from a JSON file of the run (``source``, named in the message): it must be a non-empty
    relative path without ``..``; after symlinks are followed it must still be inside the folder.

    Raises:
        RunFolderError: ``rel`` is not a string, is absolute, climbs out with ``..``, or a symlink leads out.
    """
    run = Path(run_dir)
    if not isinstance(rel, str) or not rel.strip():
        raise RunFolderError(f"{str(source)!r} names the file {rel!r}, which is not a relative path")
    parts = rel.replace("\\", "/").split("/")
    if Path(rel).is_absolute() or rel.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise RunFolderError(f"{str(source)!r} names {rel!r}, which lies outside the run folder {str(run)!r}; refused")
    path = (run / rel).resolve()
    if not path.is_relative_to(run.resolve()):
        raise RunFolderError(f"{str(source)!r} names {rel!r}, which leads outside the run folder {str(run)!r} "
                             "(a symlink); refused")
    return path


def read_json_checked(path: str | Path) -> dict[str, Any]:
    """A run folder's JSON object. Raises RunFolderError naming ``path`` when unreadable or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{str(path)!r} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunFolderError(f"{str(path)!r} is damaged (not valid JSON: {str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{str(path)!r} is damaged (a JSON {type(data).__name__}, expected an object)")
    return data


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
           torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


def read_safetensors_checked(
    path: str | Path,
    *,
    sha256: str | None = None,
    expected: Mapping[str, tuple[tuple[int | None, ...] | None, torch.dtype | None]] | None = None,
    source: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """Load a safetensors file of a run folder after checking it; tensors on CPU.

    Args:
        path: the file (already resolved with :func:`resolve_inside`).
        sha256: the hex SHA-256 recorded by the JSON that names the file (None: not recorded, e.g. older runs).
        expected: ``{name: (shape, dtype)}`` the file must hold; ``None`` in a shape means any size, a ``None``
            shape or dtype is not checked. Other names may be present.
        source: the JSON file that named ``path`` (for the message).

    Raises:
        RunFolderError: missing, SHA-256 differs, header unreadable (truncated, garbled), a name missing, or a
            shape or dtype other than expected.
    """
    path = Path(path)
    named = f" (named by {str(source)!r})" if source is not None else ""
    if not path.is_file():
        raise RunFolderError(f"{str(path)!r}{named} is missing")
    if sha256 is not None and file_sha256(path) != sha256:
        raise RunFolderError(f"{str(path)!r} is damaged: its SHA-256 differs from the one recorded{named}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            for name, (shape, dtype) in (expected or {}).items():
                if name not in names:
                    raise RunFolderError(f"{str(path)!r} is damaged: it holds no tensor {name!r}")
                got = tuple(f.get_slice(name).get_shape())
                if shape is not None and (len(got) != len(shape) or any(w not in (None, g) for w, g in zip(shape, got))):
                    raise RunFolderError(f"{str(path)!r} is damaged: {name!r} has shape {got}, expected "
                                         f"{tuple('*' if w is None else w for w in shape)}")
                if dtype is not None and f.get_slice(name).get_dtype() != _DTYPES.get(dtype, str(dtype)):
                    raise RunFolderError(f"{str(path)!r} is damaged: {name!r} has dtype "
                                         f"{f.get_slice(name).get_dtype()}, expected {_DTYPES.get(dtype, dtype)}")
            return {name: f.get_tensor(name) for name in sorted(names)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RunFolderError(f"{str(path)!r} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
