"""Shared fixtures: tiny random pipelines written once per session and loaded back like a user's model."""

from __future__ import annotations

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
