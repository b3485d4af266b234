"""Shared fixtures: tiny random pipelines written once per session and loaded back like a user's model."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd2_dir(tmp_path_factory):
    """Tiny random SD pipeline whose tokenizer pads with '!' (SD 2.x style)."""
    from conceptexpress.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd2"), pad_style="sd2")


@pytest.fixture(scope="session")
def tiny_sd1_dir(tmp_path_factory):
    """Tiny random SD pipeline whose tokenizer pads with the end-of-text token (SD 1.x style)."""
    from conceptexpress.testing import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd1"), pad_style="sd1")


@pytest.fixture(scope="session")
def tiny_pipe(tiny_sd2_dir):
    """The SD 2.x-style tiny pipeline loaded in fp32 on CPU."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd2_dir)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "coffee.jpg"


@pytest.fixture(scope="module")
def pipe(tiny_sd2_dir):
    """The SD 2.x-style tiny pipeline loaded through `load_pipeline` (the user path), fp32 on CPU."""
    from conceptexpress.models import load_pipeline

    return load_pipeline(str(tiny_sd2_dir), device="cpu")


@pytest.fixture(scope="module")
def image():
    """The example photo (600×400 RGB)."""
    from conceptexpress.io.images import load_image

    return load_image(EXAMPLE)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for tiny models: on a busy 2-core runner, OpenMP threads spinning at barriers made the
    tiny UNet/ViT calls ~5x slower than a single thread (measured: 77 s vs 15 s for tests/test_eval_*)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
