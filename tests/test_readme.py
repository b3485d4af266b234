"""The README's "From Python" examples run as written, on the tiny random pipeline.

Two substitutions only, both outside the README's text: ``load_pipeline`` returns the tiny random pipeline (no
network here), and ``TrainConfig`` is shortened to 2 steps (the README's 500 would take minutes on a CPU).
"""

from __future__ import annotations

import importlib
import os
import re
from pathlib import Path

import pytest
import torch

import conceptexpress
import conceptexpress.config as config_module
import conceptexpress.models.loading as loading_module
from conceptexpress.io.run_folder import RunFolder

ROOT = Path(__file__).resolve().parents[1]


def _python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_in_memory_example_runs_as_written(pipe, tmp_path, monkeypatch, one_torch_thread):
    blocks = _python_blocks()
    localize_block = next(b for b in blocks if "localize_concepts(" in b)
    memory_block = next(b for b in blocks if "learn_tokens(" in b)
    # Import what the examples import before patching: a module first imported while `load_pipeline` is patched
    # would keep the stand-in for the rest of the session (`from .models import load_pipeline` binds at import).
    importlib.import_module("conceptexpress.learn.api")
    importlib.import_module("conceptexpress.attention.localizer")
    monkeypatch.setattr(loading_module, "load_pipeline", lambda *a, **k: pipe)
    real = config_module.TrainConfig
    monkeypatch.setattr(config_module, "TrainConfig", lambda **kw: real(**{**kw, "steps": 2, "merge_step": 1}))
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict = {}
    exec(compile(localize_block, "README.md", "exec"), namespace)
    before = len(pipe.tokenizer)
    exec(compile(memory_block, "README.md", "exec"), namespace)
    loc, tokens, images = namespace["loc"], namespace["tokens"], namespace["images"]
    assert tokens.embeddings.shape[0] == loc.num_concepts == len(tokens.tokens)
    assert len(images) == 1 and len(images[0]) == 4
    assert len(pipe.tokenizer) == before  # generate() handed the pipeline back without the tokens
    saved = RunFolder(tmp_path / "outputs" / "coffee-edited").read_manifest()
    assert saved.token_list == list(tokens.tokens) and os.path.isfile(tmp_path / "outputs/coffee-edited/concepts/c1.safetensors")


def test_merge_and_drop_return_new_localizations(pipe, image):
    loc = conceptexpress.localize_concepts(image, pipe)
    if loc.num_concepts < 3:
        pytest.skip(f"the tiny random model found {loc.num_concepts} concepts; merge needs 3 for this check")
    merged = loc.merge(0, 2)
    assert merged.num_concepts == loc.num_concepts - 1 and loc.num_concepts == loc.clusters.masks.shape[0]
    union = loc.clusters.masks[0] | loc.clusters.masks[2]
    assert torch.equal(merged.clusters.masks[0], union)
    # The one merge rule (localize.edit): the centroid by the localization's clustering rule, not a second formula.
    from conceptexpress.localize.edit import merge_concepts

    assert torch.equal(merged.clusters.centroids, merge_concepts(loc, [0, 2]).clusters.centroids)
    assert torch.equal(merged.clusters.masks[1], loc.clusters.masks[1])
    assert set(merged.clusters.post_labels.unique().tolist()) <= set(range(-1, merged.num_concepts))
    dropped = loc.drop(1)
    assert dropped.num_concepts == loc.num_concepts - 1
    assert torch.equal(dropped.clusters.masks[1], loc.clusters.masks[2])
    assert (dropped.clusters.post_labels[loc.clusters.post_labels == 1] == -1).all()
    assert dropped.masks.shape[0] == dropped.num_concepts
    with pytest.raises(conceptexpress.ConceptExpressError):
        loc.merge(0)
    with pytest.raises(ValueError):
        loc.drop(loc.num_concepts)


def _listed_outputs() -> list[str]:
    """The names README's "What `extract` writes" lists: the first word(s) of each entry line of its code block."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## What `extract` writes", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```\n(.*?)```", section, re.S)[0]
    names = []
    for line in block.splitlines()[1:]:  # the first line is the run folder itself
        if not line.startswith("  ") or line.startswith("   "):  # a continuation of the line above
            continue
        entry = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]  # "loss.png, history.json", "masks/concept_01.png …"
        names += [name.split()[0].split("/")[0] for name in entry.split(", ")]
    return names


def test_what_extract_writes_lists_exactly_the_run_folders_names():
    listed = _listed_outputs()
    by_stem = [RunFolder.SOURCE_STEM if name.startswith(RunFolder.SOURCE_STEM + ".") else name for name in listed]
    assert sorted(by_stem) == sorted(RunFolder.EXTRACT_OUTPUTS), listed
    assert len(by_stem) == len(set(by_stem))
    assert RunFolder.source_name("photo.jpg") in listed  # the photo's copy as the README's example names it
