"""Progress bars of the evaluation (tqdm on stderr), off with ``progress=False`` or ``conceptexpress -q``."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str, enabled: bool = True) -> Iterator[Any]:
    """A tqdm bar of ``total`` steps, or a silent stand-in when disabled or when there is nothing to do."""
    if not enabled or total <= 0:
        yield _NoBar()
        return

    bar = tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()
