"""The README's tiny-model flow of paper §4: photos → extract-dataset → evaluate (Table 1) and bench-localize (Table 3)."""

from __future__ import annotations

import json

import pytest

from conceptexpress.cli import main


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    from conceptexpress.evaluate.testing import save_tiny_eval_models

    root = tmp_path_factory.mktemp("tiny-eval")
    save_tiny_eval_models(root)
    return root


def test_dataset_to_table1_and_table3(tiny_sd2_dir, tiny_eval, tmp_path):
    synth, runs, bench, ev = tmp_path / "synth", tmp_path / "runs", tmp_path / "bench", tmp_path / "eval"
    model = ["--model", str(tiny_sd2_dir), "--device", "cpu"]
    # Table 3: a synthetic CLEVR-style set through bench-localize (it writes the 3 photos too).
    assert main(["-q", "bench-localize", str(synth), "--make-synthetic", "3", *model, "--ks", "4,7", "--out", str(bench)]) == 0
    table3 = (bench / "table.md").read_text()
    for row in ("IoU", "Recall", "Precision", "k-means", "FINCH", "Ours"):
        assert row in table3
    # Table 1: the same 3 photos through extract-dataset, then evaluate.
    fast = ["--steps", "2", "--merge-step", "1", "--split-tokens", "2", "--no-samples"]
    assert main(["-q", "extract-dataset", str(synth / "images"), "--out", str(runs), *model, *fast]) == 0
    assert len(list(runs.glob("*/manifest.json"))) == 3
    flags = ["--clip", str(tiny_eval / "clip"), "--dino", str(tiny_eval / "dino"), "--sam", str(tiny_eval / "sam")]
    gen = ["--images-per-concept", "2", "--compositional-images", "1", "--steps", "2"]
    assert main(["-q", "evaluate", str(runs), "--out", str(ev), "--device", "cpu", *flags, *gen]) == 0
    table1 = (ev / "table.md").read_text()
    for col in ("SIM^I", "SIM^C", "ACC^1", "ACC^3", "CLIP", "DINO"):
        assert col in table1
    summary = json.loads((ev / "summary.json").read_text())
    assert summary  # written last: its presence means the evaluation finished
