"""Options are checked before any work, and their errors name the command-line option (issue 11, item 4);
a refused model is one line on stderr, with no library warning before it (item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conceptexpress import ModelConfig, TrainConfig
from conceptexpress.cli import main, name_flags

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "coffee.jpg"
UNLOADABLE = "nobody/nothing"  # loading it fails with exit 4: exit 2 proves the option was refused first


def _extract(capsys, tmp_path, monkeypatch, *flags):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    code = main(["extract", str(EXAMPLE), "--out", str(out), "--model", UNLOADABLE, "--device", "cpu", *flags])
    err = capsys.readouterr().err
    return code, err, out


@pytest.mark.parametrize(
    ("flags", "option"),
    [
        (["--lr", "inf"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--alpha", "-1"], "--alpha"),
        (["--seed", str(2**64)], "--seed"),
        (["--seed", "-1"], "--seed"),
        (["--device", "gpu"], "--device"),
        (["--device", "cuda:x"], "--device"),
        (["--device", "cuda:-1"], "--device"),
        (["--sample-count", "0"], "--sample-count"),
        (["--sample-steps", "0"], "--sample-steps"),
        (["--micro-batch", "-2"], "--micro-batch"),
        (["--steps", "50"], "--merge-step"),  # default merge step 100 >= 50 steps: would never merge
        (["--steps", "40", "--merge-step", "40"], "--merge-step"),
    ],
)
def test_bad_option_is_refused_before_the_model_loads_and_named_as_a_flag(
    capsys, tmp_path, monkeypatch, flags, option
):
    code, err, out = _extract(capsys, tmp_path, monkeypatch, *flags)
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert f"`{option}`" in err, err
    assert "_" not in err.split(" must ")[0], err  # the option, not the field name
    assert not (out / "localization.json").exists()


@pytest.mark.parametrize("flags", [["--steps", "50", "--no-split-merge"], ["--steps", "50", "--merge-step", "10"]])
def test_valid_merge_schedules_pass_the_checks(capsys, tmp_path, monkeypatch, flags):
    """No split-and-merge, or a merge step inside the schedule: the run goes on to load the model (exit 4 here)."""
    code, err, _ = _extract(capsys, tmp_path, monkeypatch, *flags)
    assert code == 4, err
    assert UNLOADABLE in err


def test_bas_dagger_ignores_the_merge_step(capsys, tmp_path, monkeypatch):
    """BaS† learns one token per concept from the start, so a short schedule needs no merge step."""
    code, err, _ = _extract(capsys, tmp_path, monkeypatch, "--steps", "5", "--method", "bas-dagger")
    assert code == 4, err


def test_library_refuses_a_schedule_that_never_merges():
    with pytest.raises(ValueError, match="`merge_step` must be smaller than `steps`"):
        TrainConfig(steps=100, merge_step=100).check_merge_schedule()
    TrainConfig(steps=101, merge_step=100).check_merge_schedule()
    TrainConfig(steps=2, split_merge=False).check_merge_schedule()


@pytest.mark.parametrize("device", ["cpu", "auto", "mps", "cuda", "cuda:0", "cuda:12"])
def test_device_strings_that_parse(device):
    assert ModelConfig(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0", " cuda", ""])
def test_device_strings_that_do_not(device):
    with pytest.raises(ValueError, match="`device` must be"):
        ModelConfig(device=device)


def test_name_flags_only_renames_fields_that_are_flags():
    flags = frozenset({"--merge-step", "--steps"})
    assert name_flags("`merge_step` must be < `steps`, see `pipe`", flags) == "`--merge-step` must be < `--steps`, see `pipe`"


def _cli(*argv: str) -> subprocess.Popen:
    """`python -m conceptexpress ARGV` started in the background (``.communicate()`` waits for it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "conceptexpress", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def test_a_refused_model_is_one_line_without_library_warnings(tmp_path):
    """A folder whose model_index.json names components that are not there: diffusers logs warnings while it
    fails; the user sees only the one-line error (the warnings with --debug)."""
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "X"]}')
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(512))
    models = (bad, garbage)  # both commands run side by side: each is mostly interpreter and library start-up
    procs = [_cli("extract", str(EXAMPLE), "--out", str(tmp_path / f"run{i}"), "--model", str(m), "--device", "cpu")
             for i, m in enumerate(models)]
    for model, proc in zip(models, procs):
        _, stderr = proc.communicate(timeout=300)
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert proc.returncode == 4, stderr
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(model) in lines[0], stderr
