"""Atomic writes never leave a half-written target or a temp file; output folders fail early with OutputError."""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptexpress.errors import OutputError
from conceptexpress.io import atomic as atomic_mod
from conceptexpress.io import (
    atomic_save_image,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    ensure_output_dir,
)


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _assert_output_error(exc_info, path) -> None:
    msg = str(exc_info.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert exc_info.value.exit_code == 5


def test_write_bytes_text_json_roundtrip(tmp_path):
    atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic_write_text(tmp_path / "b.txt", "héllo\n")
    out = atomic_write_json(tmp_path / "c.json", {"z": 1, "a": [1.5, "ü"]})
    assert out == tmp_path / "c.json"
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    text = (tmp_path / "c.json").read_text(encoding="utf-8")
    # indent 2, insertion order, raw UTF-8, trailing newline
    assert text == '{\n  "z": 1,\n  "a": [\n    1.5,\n    "ü"\n  ]\n}\n'
    assert json.loads(text) == {"z": 1, "a": [1.5, "ü"]}
    assert _names(tmp_path) == ["a.bin", "b.txt", "c.json"]


def test_overwrite_replaces_content(tmp_path):
    atomic_write_text(tmp_path / "m.json", "old")
    atomic_write_text(tmp_path / "m.json", "new")
    assert (tmp_path / "m.json").read_text() == "new"
    assert _names(tmp_path) == ["m.json"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permission bits")
def test_written_file_gets_umask_mode_not_0600(tmp_path):
    atomic_write_text(tmp_path / "x.txt", "x")
    mode = stat.S_IMODE((tmp_path / "x.txt").stat().st_mode)
    assert mode == 0o666 & ~atomic_mod._UMASK


def test_json_nan_is_rejected_before_writing(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "bad.json", {"loss": float("nan")})
    assert _names(tmp_path) == []


def test_failure_mid_write_leaves_no_target_and_no_temp(tmp_path, monkeypatch):
    """Data is half on disk in the temp file when fsync fails (e.g. disk full): nothing may remain."""

    def failing_fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic_mod.os, "fsync", failing_fsync)
    target = tmp_path / "manifest.json"
    with pytest.raises(OutputError, match="No space left") as info:
        atomic_write_json(target, {"tokens": ["<c1>"]})
    _assert_output_error(info, target)
    assert not target.exists()
    assert _names(tmp_path) == []


def test_failure_keeps_previous_version_intact(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    atomic_write_text(target, "complete old version")

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(atomic_mod.os, "replace", failing_replace)
    with pytest.raises(OutputError):
        atomic_write_text(target, "new version")
    assert target.read_text() == "complete old version"
    assert _names(tmp_path) == ["manifest.json"]


def test_interrupt_mid_write_leaves_no_temp(tmp_path, monkeypatch):
    def interrupted(fd):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_mod.os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "emb.safetensors", b"x" * 1000)
    assert _names(tmp_path) == []


def test_write_into_missing_folder(tmp_path):
    target = tmp_path / "missing" / "a.txt"
    with pytest.raises(OutputError) as info:
        atomic_write_text(target, "x")
    _assert_output_error(info, target)


def test_save_image_roundtrip_and_kwargs(tmp_path):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    atomic_save_image(img, tmp_path / "a.png")
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(img))
    atomic_save_image(img, tmp_path / "b.JPG", quality=90)
    assert Image.open(tmp_path / "b.JPG").format == "JPEG"
    assert _names(tmp_path) == ["a.png", "b.JPG"]


def test_save_image_unknown_suffix(tmp_path):
    target = tmp_path / "mask.xyz"
    with pytest.raises(OutputError, match="suffix") as info:
        atomic_save_image(Image.new("RGB", (4, 4)), target)
    _assert_output_error(info, target)
    assert _names(tmp_path) == []


def test_save_image_encoder_error_writes_nothing(tmp_path):
    with pytest.raises(OSError):
        atomic_save_image(Image.new("RGBA", (4, 4)), tmp_path / "a.jpg")  # JPEG has no alpha
    assert _names(tmp_path) == []


# ---------------------------------------------------------------- ensure_output_dir


def test_ensure_output_dir_creates_parents(tmp_path):
    out = ensure_output_dir(str(tmp_path / "runs" / "coffee"))
    assert out == tmp_path / "runs" / "coffee" and out.is_dir()
    assert _names(out) == []  # the write probe is removed
    (out / "keep.txt").write_text("x")
    assert ensure_output_dir(out) == out and _names(out) == ["keep.txt"]


def test_ensure_output_dir_is_a_file(tmp_path):
    (tmp_path / "out").write_text("x")
    with pytest.raises(OutputError, match="not a folder") as info:
        ensure_output_dir(tmp_path / "out")
    _assert_output_error(info, tmp_path / "out")


def test_ensure_output_dir_under_a_file(tmp_path):
    (tmp_path / "some_file").write_text("x")
    target = tmp_path / "some_file" / "sub"
    with pytest.raises(OutputError, match="cannot be created") as info:
        ensure_output_dir(target)
    _assert_output_error(info, target)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_ensure_output_dir_cannot_create_in_proc():
    target = Path("/proc/conceptexpress-test/out")
    with pytest.raises(OutputError, match="cannot be created") as info:
        ensure_output_dir(target)
    _assert_output_error(info, target)


def test_ensure_output_dir_not_writable(tmp_path, monkeypatch):
    # Tests run as root, where chmod does not stop writes: simulate the refusal of the write probe instead.
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(atomic_mod.tempfile, "mkstemp", refuse)
    target = tmp_path / "readonly"
    with pytest.raises(OutputError, match="not writable: Permission denied") as info:
        ensure_output_dir(target)
    _assert_output_error(info, target)


@pytest.mark.skipif(sys.platform == "win32" or os.geteuid() == 0, reason="root ignores permission bits")
def test_ensure_output_dir_read_only_folder(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputError):
            ensure_output_dir(ro / "out")
    finally:
        ro.chmod(0o755)
