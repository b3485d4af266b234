"""`conceptexpress localize` end to end on the tiny random pipeline, and every user error as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conceptexpress.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "coffee.jpg"


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def localized(tiny_sd2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("coffee")
    code = main(["-q", "localize", str(EXAMPLE), "--model", str(tiny_sd2_dir), "--out", str(out), "--device", "cpu"])
    return code, out


def test_localize_writes_complete_folder(localized):
    code, out = localized
    assert code == 0
    manifest = json.loads((out / "localization.json").read_text())
    n = manifest["num_concepts"]
    assert n >= 1 and len(manifest["masks"]) == n
    assert manifest["source_size"] == [600, 400]  # the example photo is not square
    assert manifest["work_size"] == [128, 88]  # tiny model: longer side 128, shorter side to a multiple of 8
    assert manifest["latent_size"] == [11, 16]
    union = np.zeros((400, 600), bool)
    for name in manifest["masks"]:
        m = np.array(Image.open(out / name))
        assert m.shape == (400, 600) and set(np.unique(m)) <= {0, 255}
        assert not (union & (m > 0)).any(), "concept masks overlap"
        union |= m > 0
    for name in ("overlay.png", "stages.png", "localization.safetensors"):
        assert (out / name).is_file()
    assert Image.open(out / "overlay.png").size == (600, 400)
    assert manifest["config"]["LocalizeConfig"]["n_max"] == 10


def test_localize_is_deterministic(localized, tiny_sd2_dir, tmp_path):
    _, first = localized
    code = main(["-q", "localize", str(EXAMPLE), "--model", str(tiny_sd2_dir), "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0
    a = json.loads((first / "localization.json").read_text())
    b = json.loads((tmp_path / "localization.json").read_text())
    assert a["num_concepts"] == b["num_concepts"]
    for name in a["masks"]:
        assert np.array_equal(np.array(Image.open(first / name)), np.array(Image.open(tmp_path / name)))
    from safetensors.torch import load_file

    ta, tb = load_file(first / "localization.safetensors"), load_file(tmp_path / "localization.safetensors")
    for key in ta:
        assert ta[key].equal(tb[key]), key


def test_python_api_matches_readme(tiny_sd2_dir):
    from conceptexpress import LocalizeConfig, load_pipeline, localize_concepts

    pipe = load_pipeline(str(tiny_sd2_dir), device="cpu")
    loc = localize_concepts(EXAMPLE, pipe, LocalizeConfig(n_max=10))
    assert loc.masks.shape == (loc.num_concepts, 400, 600)
    assert loc.clusters.centroids.shape == (loc.num_concepts, 11 * 16)


def _assert_one_line_error(code, err, expected_code, *needles):
    assert code == expected_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_image(capsys, tmp_path):
    code, _, err = _run(capsys, "localize", tmp_path / "nope.jpg", "--out", tmp_path / "o")
    _assert_one_line_error(code, err, 3, "nope.jpg")
    assert not (tmp_path / "o").exists()


def test_not_an_image(capsys, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    code, _, err = _run(capsys, "localize", bad, "--out", tmp_path / "o")
    _assert_one_line_error(code, err, 3, "notes.png")


def test_too_small_image(capsys, tmp_path):
    small = tmp_path / "small.png"
    Image.new("RGB", (20, 12), "red").save(small)
    code, _, err = _run(capsys, "localize", small, "--out", tmp_path / "o")
    _assert_one_line_error(code, err, 3, "small.png")


def test_unwritable_output(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = _run(capsys, "localize", EXAMPLE, "--out", blocker / "sub")
    _assert_one_line_error(code, err, 5)


def test_unknown_model(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run(capsys, "localize", EXAMPLE, "--model", "nobody/nothing", "--out", tmp_path / "o", "--device", "cpu")
    _assert_one_line_error(code, err, 4, "nobody/nothing")
    assert not (tmp_path / "o" / "localization.json").exists()


@pytest.mark.parametrize(
    "flags", [["--n-max", "1"], ["--resolution", "16"], ["--resolution", "100"], ["--dtype", "fp8"], ["--weighting", "x"],
              ["--n-max", "ten"], ["--clustering", "x"]]
)
@pytest.mark.parametrize("command", ["localize", "extract"])
def test_bad_option_values(capsys, tmp_path, flags, command):
    """Every option is checked before anything (not even the folder or its lock) is written into --out."""
    code, _, err = _run(capsys, command, EXAMPLE, "--out", tmp_path / "o", *flags)
    _assert_one_line_error(code, err, 2)
    assert flags[0] in err or flags[0][2:].replace("-", "_") in err
    assert not (tmp_path / "o").exists()


def test_zero_concepts_is_a_clear_exit(capsys, tmp_path, tiny_sd2_dir, monkeypatch):
    """A result with no concept writes its (truthful) manifest and exits 6 with one line."""
    import conceptexpress.attention.localizer as localizer
    from conceptexpress.localize import cluster_concepts

    def no_concepts(attn, eot, n_max=10, **options):
        return cluster_concepts(attn, eot.new_ones(eot.shape), n_max=n_max, **options)  # constant [EOT]: none passes

    monkeypatch.setattr(localizer, "cluster_concepts", no_concepts)
    code, _, err = _run(capsys, "localize", EXAMPLE, "--model", tiny_sd2_dir, "--out", tmp_path, "--device", "cpu")
    _assert_one_line_error(code, err, 6, "no salient concept")
    assert json.loads((tmp_path / "localization.json").read_text())["num_concepts"] == 0
