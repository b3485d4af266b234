"""Models that are not a supported family, and diffusers folders with pickled weights only, are refused before
any weight loads: exactly one stderr line through the CLI, exit code 4, no library output (issues 26, 27)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conceptexpress.errors import ModelLoadError
from conceptexpress.models import load_pipeline
from conceptexpress.models.family import SUPPORTED, UnsupportedModelError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "coffee.jpg"


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def refused_models(tiny_sdxl_dir, tiny_sd2_dir, tmp_path_factory):
    """{name: (folder, words the message must hold)} of three folders that must be refused before loading."""
    root = tmp_path_factory.mktemp("refused")
    refiner = root / "sdxl-refiner"
    shutil.copytree(tiny_sdxl_dir, refiner)
    shutil.rmtree(refiner / "text_encoder")
    shutil.rmtree(refiner / "tokenizer")
    _edit_json(refiner / "model_index.json", _class_name="StableDiffusionXLImg2ImgPipeline",
               text_encoder=[None, None], tokenizer=[None, None])  # fmt: skip
    inpaint = root / "sd-inpainting"
    shutil.copytree(tiny_sd2_dir, inpaint)
    _edit_json(inpaint / "unet" / "config.json", in_channels=9)  # the weights no longer fit: never read
    pickled = root / "pickled"
    shutil.copytree(tiny_sd2_dir, pickled)
    from safetensors.torch import load_file

    for f in list(pickled.rglob("*.safetensors")):
        name = "pytorch_model.bin" if f.name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(load_file(f), f.with_name(name))
        f.unlink()
    return {
        "refiner": (refiner, ("SDXL refiner", SUPPORTED)),
        "inpainting": (inpaint, ("9 input channels", "inpainting", SUPPORTED)),
        "pickled": (pickled, ("pickled weights only", "unet/diffusion_pytorch_model.bin", ".safetensors")),
    }


@pytest.mark.parametrize("name", ["refiner", "inpainting", "pickled"])
def test_refused_before_any_weight_loads(refused_models, monkeypatch, name):
    import diffusers

    folder, words = refused_models[name]

    def no_loading(*args, **kwargs):
        raise AssertionError("from_pretrained was called")

    monkeypatch.setattr(diffusers.DiffusionPipeline, "from_pretrained", no_loading)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(ModelLoadError) as err:
        load_pipeline(str(folder), device="cpu")
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
    assert all(w in message for w in words), message
    assert isinstance(err.value, UnsupportedModelError) == (name != "pickled")
    assert err.value.exit_code == 4


@pytest.mark.parametrize("name", ["refiner", "inpainting"])
def test_cli_refusals_are_one_line(refused_models, tmp_path, monkeypatch, capfd, name):
    """`conceptexpress localize` in this process (fd-level capture): exit 4, exactly one stderr line."""
    from conceptexpress.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = refused_models[name][0]
    code = main(["localize", str(EXAMPLE), "--out", str(tmp_path / "run"), "--model", str(folder), "--device", "cpu"])
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 4, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(folder) in lines[0], err


def test_cli_pickled_folder_is_one_line_without_library_output(refused_models, tmp_path):
    """A fresh `python -m conceptexpress localize` (library logging as a user gets it): diffusers/transformers
    logged a line before failing on pickled weights (issue 26); now exit 4 and exactly one stderr line."""
    folder = refused_models["pickled"][0]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "conceptexpress", "localize", str(EXAMPLE), "--out", str(tmp_path / "run"),
           "--model", str(folder), "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 4, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "pickled weights only" in lines[0], proc.stderr
