"""Run-folder lock: a second process is refused at once, waits when asked, and a killed holder never blocks."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conceptexpress.errors import OutputError
from conceptexpress.io.lock import RunLockedError, run_lock

HOLD = textwrap.dedent(
    """
    import sys, time
    from conceptexpress.io.lock import run_lock
    with run_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def _holder(folder, seconds):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_process_refused_with_holder_named(tmp_path):
    p = _holder(tmp_path / "run", 30)
    try:
        with pytest.raises(RunLockedError, match=rf"in use by pid {p.pid}") as e, run_lock(tmp_path / "run"):
            pass
        assert e.value.exit_code == 5 and isinstance(e.value, OutputError)
    finally:
        p.kill()
        p.wait()


def test_killed_holder_does_not_block(tmp_path):
    p = _holder(tmp_path / "run", 30)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert (tmp_path / "run" / ".lock").exists()  # the file stays; nothing holds it
    with run_lock(tmp_path / "run"):
        pass


def test_wait_gets_the_lock_when_holder_finishes(tmp_path):
    p = _holder(tmp_path / "run", 1.0)
    t0 = time.monotonic()
    with run_lock(tmp_path / "run", wait=True, poll=0.05):
        waited = time.monotonic() - t0
    p.wait()
    assert waited > 0.3


def test_wait_timeout_raises(tmp_path):
    p = _holder(tmp_path / "run", 30)
    try:
        with pytest.raises(RunLockedError), run_lock(tmp_path / "run", wait=True, poll=0.05, timeout=0.3):
            pass
    finally:
        p.kill()
        p.wait()


def test_released_after_exception_and_reentrant_sequentially(tmp_path):
    with pytest.raises(KeyError), run_lock(tmp_path / "run"):
        raise KeyError("x")
    with run_lock(tmp_path / "run"):
        pass


def test_unwritable_folder_is_output_error(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(OutputError, match="cannot create the lock"), run_lock(f / "run"):
        pass


def test_extract_refuses_a_locked_run_folder_before_any_work(tmp_path):
    from PIL import Image

    from conceptexpress.config import ModelConfig, RunConfig
    from conceptexpress.extract import extract

    src = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(src)
    run = tmp_path / "run"
    # The lock is held here: another open of the lock file conflicts, as another process would. The model does
    # not exist: the refusal comes before any loading.
    with run_lock(run), pytest.raises(RunLockedError, match="in use"):
        extract(src, run, RunConfig(model=ModelConfig(model=str(tmp_path / "no-model")), progress=False))
    assert not (run / "manifest.json").exists()


def test_cli_extract_on_a_locked_folder_exits_5_with_one_line(tmp_path, capsys):
    from PIL import Image

    from conceptexpress.cli import main

    src = tmp_path / "photo.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(src)
    run = tmp_path / "run"
    with run_lock(run):
        code = main(["extract", str(src), "--out", str(run), "--model", str(tmp_path / "no-model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 5 and len(err) == 1 and "in use" in err[0], err
