"""Concept editing: the pure edits of `localize/edit.py`, the run-folder rewrite, and `conceptexpress edit`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptexpress.cli import main
from conceptexpress.config import LocalizeConfig
from conceptexpress.localize import edit
from conceptexpress.localize.edit import EditError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "coffee.jpg"
FAST = ["--steps", "4", "--merge-step", "2", "--split-tokens", "2", "--no-samples", "--checkpoint-every", "2"]


@pytest.fixture(scope="module", params=["released", "paper"])
def localized(request, pipe, image, one_torch_thread):
    from conceptexpress.attention.localizer import ConceptLocalizer

    localizer = ConceptLocalizer(pipe, LocalizeConfig(clustering=request.param))
    loc = localizer(image)
    assert loc.num_concepts >= 4  # the tiny model finds 4 on the example photo; the edits below need that many
    return loc, localizer.attention(image).attn


def _consistent(loc) -> None:
    """Masks disjoint, numbered in raster order, post_labels and source-size masks agree with them."""
    from conceptexpress.io.images import upsample_masks

    c = loc.clusters
    n = loc.num_concepts
    assert c.masks.shape[0] == c.centroids.shape[0] == loc.masks.shape[0] == n
    assert int(c.masks.sum(0).max()) <= 1
    expected = torch.full(c.post_labels.shape, -1, dtype=torch.long)
    for i in range(n):
        expected[c.masks[i]] = i
    assert torch.equal(expected, c.post_labels)
    firsts = [int(torch.nonzero(c.masks[i].reshape(-1))[0]) for i in range(n)]
    assert firsts == sorted(firsts)
    assert np.array_equal(loc.masks, upsample_masks(c.masks.numpy(), loc.source_size))
    assert torch.allclose(c.centroids.sum(1), torch.ones(n), atol=1e-4)  # means of attention rows


def test_centroid_rule_gives_back_the_localization(localized):
    loc, attn = localized
    c = loc.clusters
    for i in range(loc.num_concepts):
        f = edit.concept_centroid(c.masks[i], attn, c.pre_labels, c.clustering)
        assert torch.allclose(f, c.centroids[i], atol=1e-6)


def test_merge(localized):
    loc, attn = localized
    merged = edit.merge_concepts(loc, [1, 2])
    _consistent(merged)
    assert merged.num_concepts == loc.num_concepts - 1
    union = loc.clusters.masks[1] | loc.clusters.masks[2]
    j = int(merged.clusters.post_labels.reshape(-1)[torch.nonzero(union.reshape(-1))[0]])
    assert j == 1 and torch.equal(merged.clusters.masks[j], union)  # the lower number, as on the overlay
    exact = edit.concept_centroid(union, attn, loc.clusters.pre_labels, loc.clusters.clustering)
    assert torch.allclose(merged.clusters.centroids[j], exact, atol=1e-6)  # combined without A = recomputed
    assert torch.allclose(edit.merge_concepts(loc, [1, 2], attn=attn).clusters.centroids[j], exact, atol=1e-6)
    assert torch.equal(merged.clusters.centroids[0], loc.clusters.centroids[0])  # others untouched


def test_drop(localized):
    loc, _ = localized
    dropped = edit.drop_concepts(loc, [0, 3])
    _consistent(dropped)
    assert dropped.num_concepts == loc.num_concepts - 2
    assert torch.equal(dropped.clusters.masks, loc.clusters.masks[[1, 2]])
    assert torch.equal(dropped.clusters.centroids, loc.clusters.centroids[[1, 2]])
    assert "dropped concepts 1, 4" in dropped.clusters.messages[-1]


def test_split(localized):
    loc, attn = localized
    big = int(loc.clusters.masks.reshape(loc.num_concepts, -1).sum(1).argmax())
    split = edit.split_concept(loc, big, attn)
    _consistent(split)
    added = split.num_concepts - loc.num_concepts + 1
    assert added >= 2
    before = {tuple(m.reshape(-1).nonzero().reshape(-1).tolist()) for m in loc.clusters.masks}
    pieces = [m for m in split.clusters.masks if tuple(m.reshape(-1).nonzero().reshape(-1).tolist()) not in before]
    assert len(pieces) == added and torch.equal(torch.stack(pieces).any(0), loc.clusters.masks[big])
    for m, f in zip(split.clusters.masks, split.clusters.centroids):
        expected = edit.concept_centroid(m, attn, loc.clusters.pre_labels, loc.clusters.clustering)
        assert torch.allclose(f, expected, atol=1e-6)


def test_add_from_a_source_size_mask(localized):
    loc, attn = localized
    w, h = loc.source_size
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[: h // 2, : w // 2] = 255  # the top-left quarter of the photo
    added = edit.add_concept(loc, mask, attn)
    _consistent(added)
    lh, lw = loc.latent_hw
    quarter = torch.zeros(lh, lw, dtype=torch.bool)
    quarter[: lh // 2, : lw // 2] = True
    assert any(torch.equal(m, quarter) for m in added.clusters.masks)
    assert not any(bool((m & quarter).any()) for m in added.clusters.masks if not torch.equal(m, quarter))
    for m, f in zip(added.clusters.masks, added.clusters.centroids):
        expected = edit.concept_centroid(m, attn, loc.clusters.pre_labels, loc.clusters.clustering)
        assert torch.allclose(f, expected, atol=1e-6)


def test_edit_errors_name_the_problem(localized):
    loc, attn = localized
    with pytest.raises(EditError, match="concept 9 does not exist"):
        edit.drop_concepts(loc, [9])
    with pytest.raises(EditError, match="at least two"):
        edit.merge_concepts(loc, [1])
    with pytest.raises(EditError, match="self-attention"):
        edit.split_concept(loc, 0, None)
    with pytest.raises(EditError, match="covers no latent pixel"):
        edit.add_concept(loc, np.zeros(loc.masks.shape[1:], dtype=bool), attn)
    with pytest.raises(EditError, match="draw it on the same photo"):
        edit.add_concept(loc, np.ones((7, 9), dtype=bool), attn)


# ----------------------------------------------------------------------------- the run folder and the CLI
@pytest.fixture(scope="module")
def run(tiny_sd2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("edit-run")
    assert main(["-q", "localize", str(EXAMPLE), "--model", str(tiny_sd2_dir), "--out", str(out), "--device", "cpu"]) == 0
    return out


def _loc_manifest(out: Path) -> dict:
    return json.loads((out / "localization.json").read_text())


def test_run_folder_round_trip(localized, tiny_sd2_dir, tmp_path):
    from conceptexpress.localization_stage import load_localization

    fresh, _ = localized
    mode = fresh.clusters.clustering
    argv = ["-q", "localize", str(EXAMPLE), "--model", str(tiny_sd2_dir), "--out", str(tmp_path), "--device", "cpu"]
    assert main([*argv, "--clustering", mode]) == 0
    loc, manifest = load_localization(tmp_path)
    assert loc.clusters.clustering == mode
    for name in ("masks", "centroids", "pre_labels", "post_labels", "kept"):
        assert torch.equal(getattr(loc.clusters, name), getattr(fresh.clusters, name)), name
    assert np.array_equal(loc.masks, fresh.masks) and manifest["num_concepts"] == fresh.num_concepts


def test_cli_edit_merge_drop_split_add_then_extract_and_resume(run, tiny_sd2_dir, tmp_path, capsys):
    n = _loc_manifest(run)["num_concepts"]
    old_overlay = (run / "overlay.png").read_bytes()

    # 1. merge + drop: no model needed; the old localization is kept as backup 001.
    assert main(["edit", str(run), "--merge", "1,2", "--drop", str(n)]) == 0
    assert "concepts" in capsys.readouterr().out
    m = _loc_manifest(run)
    assert m["num_concepts"] == n - 2 and m["edits"] == [f"drop {n}", "merge 1,2"]
    backup = run / "backups" / "localization-001"
    assert _loc_manifest(backup)["num_concepts"] == n and (backup / "overlay.png").read_bytes() == old_overlay
    assert len(list((run / "masks").glob("concept_*.png"))) == n - 2
    assert not list(run.glob(".edit-*"))  # staging removed

    # 2. split + add (loads the model to recompute the attention): backup 002.
    w, h = m["source_size"]
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[-h // 3:, -w // 3:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert main(["edit", str(run), "--split", "1", "--add-mask", str(tmp_path / "m.png"), "--device", "cpu"]) == 0
    m2 = _loc_manifest(run)
    assert m2["edits"][-2:] == ["split 1", "add mask 1"] and m2["num_concepts"] >= m["num_concepts"] + 2
    assert (run / "backups" / "localization-002" / "localization.json").is_file()

    # 3. extract trains on the edited concepts (the localization is reused, not recomputed).
    stamp = (run / "localization.safetensors").stat().st_mtime_ns
    args = ["-q", "extract", str(EXAMPLE), "--model", str(tiny_sd2_dir), "--out", str(run), "--device", "cpu", *FAST]
    assert main(args) == 0
    assert (run / "localization.safetensors").stat().st_mtime_ns == stamp
    trained = json.loads((run / "manifest.json").read_text())
    assert trained["num_concepts"] == m2["num_concepts"]

    # 4. Editing again moves the trained outputs to the backup; resuming the old checkpoint is refused.
    assert main(["edit", str(run), "--merge", "1,2"]) == 0
    backup3 = run / "backups" / "localization-003"
    assert (backup3 / "manifest.json").is_file() and (backup3 / "concepts").is_dir()
    assert not (run / "manifest.json").exists() and not (run / "concepts").exists()
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint in") and "localization (edited since?)" in err and err[-1] == "\n"


def test_cli_edit_errors_are_one_line(run, capsys, tmp_path):
    n = _loc_manifest(run)["num_concepts"]
    cases = [
        (["edit", str(run)], "nothing to edit"),
        (["edit", str(run), "--drop", str(n + 5)], f"concept {n + 5} does not exist"),
        (["edit", str(run), "--merge", "1,2", "--drop", "2"], "named by more than one edit"),
        (["edit", str(tmp_path), "--drop", "1"], "no finished localization"),
        (["edit", str(run), "--add-mask", str(tmp_path / "none.png")], "no such file"),
    ]
    for argv, message in cases:
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert _loc_manifest(run)["num_concepts"] == n  # nothing changed


def test_cli_edit_refuses_a_locked_run(run, capsys):
    from conceptexpress.io.lock import run_lock

    with run_lock(run):
        assert main(["edit", str(run), "--drop", "1"]) == 5
    assert "in use" in capsys.readouterr().err


def test_extract_with_other_options_keeps_an_edited_localization(tiny_sd2_dir, tmp_path, capsys):
    """Edits are the user's work: an `extract` whose options would recompute the localization is refused (exit 5,
    before the model loads) unless --overwrite, which recomputes it without the edits."""
    import json

    out = tmp_path / "run"
    base = ["-q", "localize", str(EXAMPLE), "--model", str(tiny_sd2_dir), "--out", str(out), "--device", "cpu"]
    assert main(base) == 0
    assert main(["edit", str(out), "--merge", "1,2"]) == 0
    capsys.readouterr()
    extract = ["-q", "extract", str(EXAMPLE), "--model", str(tiny_sd2_dir), "--out", str(out), "--device", "cpu", *FAST]
    assert main([*extract, "--n-max", "5"]) == 5  # another LocalizeConfig would recompute the localization
    assert "edited localization" in capsys.readouterr().err
    assert json.loads((out / "localization.json").read_text())["edits"]
    assert main([*extract, "--n-max", "5", "--overwrite"]) == 0
    assert not json.loads((out / "localization.json").read_text()).get("edits")


@pytest.mark.parametrize("clustering", ["released", "paper"])
@pytest.mark.parametrize("edit_args", [("--merge", "1,2"), ("--drop", "2")])
def test_api_edit_and_cli_edit_give_identical_masks_and_centroids(tiny_sd2_dir, tmp_path, clustering, edit_args):
    """One rule: `loc.merge(0, 1)` / `loc.drop(1)` in a notebook and `conceptexpress edit --merge 1,2` / `--drop 2`
    give the same concepts, masks and centroids f_i (Eq. 6-7: what token learning reads) under either clustering."""
    from conceptexpress.localization_stage import load_localization

    argv = ["-q", "localize", str(EXAMPLE), "--model", str(tiny_sd2_dir), "--out", str(tmp_path), "--device", "cpu"]
    assert main([*argv, "--clustering", clustering]) == 0
    before, _ = load_localization(tmp_path)
    assert before.num_concepts >= 3
    flag, value = edit_args
    api = before.merge(0, 1) if flag == "--merge" else before.drop(1)
    assert main(["-q", "edit", str(tmp_path), flag, value]) == 0
    cli, _ = load_localization(tmp_path)
    assert cli.num_concepts == api.num_concepts == before.num_concepts - 1
    for name in ("masks", "centroids", "post_labels"):
        assert torch.equal(getattr(cli.clusters, name), getattr(api.clusters, name)), name
    assert np.array_equal(cli.masks, api.masks)
