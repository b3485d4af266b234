"""Model loading: the tiny random pipelines load through the user path; bad models fail in one clear line."""

from __future__ import annotations

import unittest.mock

import pytest
import torch

from conceptexpress.config import ModelConfig
from conceptexpress.errors import ConfigError, ModelLoadError
from conceptexpress.models import load_pipeline, resolve_device, resolve_dtype


def test_folder_loads_frozen_on_cpu(tiny_sd2_dir):
    pipe = load_pipeline(str(tiny_sd2_dir), device="cpu")
    assert pipe.unet.device.type == "cpu" and pipe.unet.dtype == torch.float32
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    assert pipe.safety_checker is None
    # a pathlib.Path works as well as a string (``load_pipeline(toy_pipeline_path())``), in a ModelConfig too
    assert load_pipeline(tiny_sd2_dir, device="cpu").unet.config == pipe.unet.config
    assert ModelConfig(model=tiny_sd2_dir).model == str(tiny_sd2_dir)


def test_dtype_choice(tiny_sd2_dir):
    pipe = load_pipeline(ModelConfig(model=str(tiny_sd2_dir), device="cpu", dtype="bf16"))
    assert pipe.unet.dtype == torch.bfloat16 and pipe.text_encoder.dtype == torch.bfloat16


def test_auto_dtype_and_device():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    # auto on CUDA: the dtype token learning autocasts to (bf16 where supported), so no second copy of the weights
    with unittest.mock.patch("torch.cuda.is_bf16_supported", return_value=True):
        assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    with unittest.mock.patch("torch.cuda.is_bf16_supported", return_value=False):
        assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.parametrize(
    "kwargs, match",
    [({"dtype": "fp8"}, "dtype"), ({"device": "tpu"}, "device"), ({"model": " "}, "model")],
)
def test_bad_model_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        ModelConfig(**kwargs)


def test_unknown_hub_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        load_pipeline("no-such-org/no-such-model", device="cpu")
    msg = str(err.value)
    assert "hub id 'no-such-org/no-such-model'" in msg and "local diffusers folder" in msg
    assert "\n" not in msg


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file or folder"):
        load_pipeline(str(tmp_path / "nowhere" / "model"), device="cpu")


def test_folder_without_model_index(tmp_path):
    with pytest.raises(ModelLoadError, match="not a diffusers pipeline"):
        load_pipeline(str(tmp_path), device="cpu")


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt"])
def test_pickle_checkpoints_refused(tmp_path, suffix):
    f = tmp_path / f"model{suffix}"
    f.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ModelLoadError, match="never loaded"):
        load_pipeline(str(f), device="cpu")


def test_corrupt_folder_is_a_clear_error(tiny_sd2_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd2_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="could not load folder"):
        load_pipeline(str(broken), device="cpu")


def test_hub_id_resolves_from_local_cache(tiny_sd2_dir, tmp_path, monkeypatch):
    """The hub-id route, offline: a populated Hugging Face cache stands in for the network."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-sd"
    shutil.copytree(tiny_sd2_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    pipe = load_pipeline("tiny-org/tiny-sd", device="cpu")
    assert pipe.unet.config.sample_size == 16
