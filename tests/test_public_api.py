"""The public API is importable lazily, and the pure cores never pull diffusers in."""

from __future__ import annotations

import pytest

import conceptexpress


@pytest.mark.parametrize("name", [n for n in conceptexpress.__all__ if n != "__version__"])
def test_every_export_resolves(name):
    assert getattr(conceptexpress, name) is not None


@pytest.mark.parametrize("module", ["conceptexpress.localize", "conceptexpress.learn.losses", "conceptexpress.attention.aggregate"])
def test_pure_cores_do_not_import_diffusers(module, heavy_imports):
    assert heavy_imports[module] == []
