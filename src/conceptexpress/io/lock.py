"""One process per run folder: an OS advisory lock held for the life of a run.

The lock is ``flock`` on ``<folder>/.lock`` (``msvcrt.locking`` on Windows). The operating system releases it
when the holding process exits in any way — normal exit, exception, Ctrl-C, SIGKILL — so a lock left by a
killed process never blocks: the lock *file* may remain, but nothing holds it. The file records the holder's
pid and host for the error message only; it is never trusted for the decision.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputError

LOCK_NAME = ".lock"


class RunLockedError(OutputError):
    """Another process holds the run folder (exit code 5, as for any output-folder problem)."""


def _try_lock(fd: int) -> bool:
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        return f"pid {int(info['pid'])} on {str(info['host'])[:64]}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextmanager
def run_lock(folder: str | Path, wait: bool = False, poll: float = 0.2, timeout: float | None = None) -> Iterator[Path]:
    """Hold the lock of run folder ``folder`` (created if missing) for the ``with`` block.

    Args:
        folder: the run folder.
        wait: if another process holds it, wait for it instead of raising.
        poll: seconds between attempts while waiting.
        timeout: with ``wait``, give up after this many seconds (None = wait for ever).

    Raises:
        RunLockedError: the folder is held by another live process (and ``wait`` is false or timed out).
        OutputError: the folder or its lock file cannot be created.
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(f"cannot create the lock of run folder {folder}: {e.strerror or e}") from None
    try:
        start = time.monotonic()
        while not _try_lock(fd):
            if not wait or (timeout is not None and time.monotonic() - start >= timeout):
                raise RunLockedError(
                    f"run folder {folder} is in use by {_holder(path)}; wait for it to finish "
                    f"(or pass --wait), or choose another --out"
                )
            time.sleep(poll)
        try:  # informative only: who holds it
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
        except OSError:
            pass
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
