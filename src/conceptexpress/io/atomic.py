"""Atomic file writes: a file either has its complete new content or does not change.

Every write goes to a hidden temp file in the target's folder (same filesystem, so the rename is atomic),
is flushed and fsynced, then moved over the target with ``os.replace``. An interrupted run (exception,
Ctrl-C, full disk) therefore never leaves a half-written ``manifest.json`` or embedding that looks complete,
and the temp file is removed on every error path.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from conceptexpress.errors import OutputError

_TMP_SUFFIX = ".tmp"

# mkstemp creates files with mode 0600; finished outputs should get the usual 0666 & ~umask instead. The umask
# can only be read by setting it, so this is done once at import rather than racing other threads per write.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK


def _describe(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself; best effort (not supported on Windows or some filesystems)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + fsync + ``os.replace``).

    The folder must exist (see :func:`ensure_output_dir`). An existing file at ``path`` is replaced only once
    the new content is fully on disk; on any failure it is left untouched and no temp file remains.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputError: the file cannot be written (folder missing or read-only, disk full, ...).
    """
    path = Path(path)
    folder = path.parent
    try:
        fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    except OSError as e:
        raise OutputError(f"cannot write '{path}': {_describe(e)}") from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(OSError, AttributeError):
            os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException as e:
        # BaseException: a Ctrl-C between write and rename must not leave the temp file behind either.
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError):
            raise OutputError(f"cannot write '{path}': {_describe(e)}") from None
        raise
    _fsync_dir(folder)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding`` (UTF-8 by default), newlines as given."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as JSON (indent 2, keys in insertion order, UTF-8, trailing newline) atomically.

    Raises:
        ValueError: ``obj`` contains NaN or infinity (not valid JSON), raised before anything is written.
        TypeError: ``obj`` contains a value JSON cannot represent.
    """
    # Serialize first: a bad value must fail before a temp file exists.
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def atomic_save_image(img: Image.Image, path: str | Path, **save_kwargs: Any) -> Path:
    """Save ``img`` atomically; the format follows the suffix of ``path`` (``.png``, ``.jpg``, ``.webp``, ...).

    The image is encoded in memory first, so an encoder error leaves nothing on disk. ``save_kwargs`` go to
    ``PIL.Image.Image.save`` (e.g. ``quality=95``).

    Raises:
        OutputError: the suffix is not an image format Pillow can write, or the file cannot be written.
    """
    path = Path(path)
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise OutputError(f"cannot save image to '{path}': unknown image file suffix {path.suffix!r}")
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save_kwargs)
    return atomic_write_bytes(path, buf.getvalue())


def ensure_output_dir(path: str | Path) -> Path:
    """Create the output folder ``path`` (with parents) and prove it is writable.

    Writability is tested by creating and deleting a temp file, because permission bits lie (root, ACLs,
    read-only mounts). Call it before any expensive work so that a bad ``--output`` fails in a second.

    Returns:
        ``path`` as a ``Path``.

    Raises:
        OutputError: ``path`` exists as a file, cannot be created (e.g. a parent is a file), or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output folder '{path}' exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"output folder '{path}' cannot be created: a parent is not a folder") from None
    except NotADirectoryError:
        raise OutputError(f"output folder '{path}' cannot be created: a parent is a file") from None
    except OSError as e:
        raise OutputError(f"output folder '{path}' cannot be created: {_describe(e)}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-", suffix=_TMP_SUFFIX)
    except OSError as e:
        raise OutputError(f"output folder '{path}' is not writable: {_describe(e)}") from None
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return path
