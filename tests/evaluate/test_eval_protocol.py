"""`evaluate` end to end on tiny models: runs from `extract`, generation and SAM caches, result files, CLI."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from conceptexpress.cli import main
from conceptexpress.cli.evaluate import add_parser as add_evaluate_parser
from conceptexpress.errors import ConfigError, InputError, ModelLoadError
from conceptexpress.evaluate import EvalConfig, evaluate_runs

EXTRACT_FAST = ["--steps", "2", "--merge-step", "1", "--split-tokens", "2", "--no-samples", "--device", "cpu"]
COLUMNS = "| Method | SIM^I | SIM^C | ACC^1 | ACC^3 |"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _photo(path: Path, background, shapes) -> Path:
    img = Image.new("RGB", (96, 96), background)
    draw = ImageDraw.Draw(img)
    for kind, box, colour in shapes:
        (draw.ellipse if kind == "ellipse" else draw.rectangle)(box, fill=colour)
    img.save(path)
    return path


@pytest.fixture(scope="module")
def dataset(tiny_sd2_dir, tmp_path_factory):
    """RUNS/ with two finished runs (real `extract` on the tiny model), a BaS† copy, tiny evaluation models."""
    from conceptexpress.evaluate.testing import save_tiny_eval_models

    root = tmp_path_factory.mktemp("eval-data")
    photos = [
        _photo(root / "cups.png", (235, 235, 220), [("ellipse", (8, 10, 44, 46), (200, 30, 30)), ("rect", (52, 50, 88, 86), (30, 60, 200))]),
        _photo(root / "toys.png", (40, 120, 40), [("rect", (10, 50, 40, 90), (240, 220, 20)), ("ellipse", (50, 8, 90, 48), (120, 20, 160))]),
    ]
    runs = root / "RUNS"
    for photo in photos:
        code = main(["-q", "extract", str(photo), "--model", str(tiny_sd2_dir), "--out", str(runs / photo.stem), *EXTRACT_FAST])
        assert code == 0
    # BaS† stand-in: the same tokens relabelled (a real `--method bas-dagger` run is tested in test_bas.py). BaS†
    # trains on ConceptExpress's masks, so both methods have the same concepts, as in the paper.
    bas = root / "RUNS-bas"
    shutil.copytree(runs / "cups", bas / "cups")
    manifest = json.loads((bas / "cups" / "manifest.json").read_text())
    (bas / "cups" / "manifest.json").write_text(json.dumps({**manifest, "method": "bas-dagger"}))
    models = save_tiny_eval_models(root / "models")
    return {"root": root, "runs": runs, "bas": bas, "models": models}


def _config(models, **kw) -> EvalConfig:
    base = dict(
        images_per_concept=2, compositional_images=1, steps=2,
        clip=str(models["clip"]), dino=str(models["dino"]), sam=str(models["sam"]),
    )
    return EvalConfig(**{**base, **kw})


def _counting_loader(calls):
    from conceptexpress.models import load_pipeline

    def loader(model_config):
        calls.append(model_config.model)
        return load_pipeline(model_config)

    return loader


def _num_concepts(run: Path) -> int:
    return json.loads((run / "manifest.json").read_text())["num_concepts"]


@pytest.fixture(scope="module")
def first(dataset):
    calls: list[str] = []
    result = evaluate_runs(
        [dataset["runs"], dataset["bas"]], _config(dataset["models"]), pipe_loader=_counting_loader(calls),
        out_dir=dataset["root"] / "out", model_options={"device": "cpu"}, progress=False,
    )
    return result, calls


def test_result_files_have_one_row_per_concept_and_encoder(dataset, first):
    result, calls = first
    out = dataset["root"] / "out"
    assert len(calls) == 1  # one base model, loaded once for all runs of both methods
    n_ours = sum(_num_concepts(r) for r in (dataset["runs"] / "cups", dataset["runs"] / "toys"))
    n_bas = _num_concepts(dataset["bas"] / "cups")
    rows = list(csv.DictReader((out / "concepts.csv").open()))
    assert len(rows) == (n_ours + n_bas) * 2 == len(json.loads((out / "concepts.json").read_text()))
    assert {r["encoder"] for r in rows} == {"clip", "dino"}
    for r in rows:
        assert -1.0 <= float(r["sim_i"]) <= 1.0
        assert 0 <= int(r["top1_correct"]) <= int(r["top3_correct"]) <= int(r["images"]) == 2
    images = list(csv.DictReader((out / "images.csv").open()))
    assert len(images) == 3 * 2 and all(-1.0 <= float(r["sim_c"]) <= 1.0 for r in images)
    # Every concept's images were generated and cached in its run folder.
    for run in (dataset["runs"] / "cups", dataset["runs"] / "toys"):
        (gen,) = (run / "eval").glob("generated-*")
        assert len(list(gen.glob("concept_*/0*.png"))) == 2 * _num_concepts(run)
        assert len(list(gen.glob("all/0*.png"))) == 1
        (sam,) = (run / "eval").glob("sam-*")
        assert len(list(sam.glob("concept_*.png"))) == _num_concepts(run)


def test_summary_and_table_follow_paper_table_1(dataset, first):
    result, _ = first
    out = dataset["root"] / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary == result.summary and summary["complete"] is True
    assert summary["encoders"] == {"clip": str(dataset["models"]["clip"]), "dino": str(dataset["models"]["dino"])}
    assert summary["sam"] == str(dataset["models"]["sam"]) and summary["config"]["images_per_concept"] == 2
    assert set(summary["methods"]) == {"conceptexpress", "bas-dagger"}
    for method in summary["methods"].values():
        for scores in method["metrics"].values():
            assert -1 <= scores["sim_i"] <= 1 and -1 <= scores["sim_c"] <= 1
            assert 0 <= scores["acc1"] <= scores["acc3"] <= 1
    table = (out / "table.md").read_text()
    assert table == result.table and table.count(COLUMNS) == 2  # one block per encoder
    assert "CLIP" in table and "DINO" in table
    lines = table.splitlines()
    assert lines.index(next(x for x in lines if x.startswith("| BaS† |"))) < lines.index(
        next(x for x in lines if x.startswith("| ConceptExpress |"))
    )  # paper order: baseline, then ours
    value = result.metric("conceptexpress", "clip", "sim_i")
    assert f"{value:.3f}" in table
    # The sampler is recorded: the released DDIM by default, in the summary, the table and each image record.
    assert EvalConfig().scheduler == "ddim" and (EvalConfig().steps, EvalConfig().guidance) == (50, 7.5)
    assert summary["config"]["scheduler"] == "ddim" and "DDIM (released sampler), 2 steps, guidance 7.5" in table
    record = json.loads(next((dataset["runs"] / "cups" / "eval").glob("generated-*/concept_01/*.json")).read_text())
    assert record["sampler"]["class"] == "DDIMScheduler" and record["sampler"]["steps"] == 2


def test_bas_copy_has_the_same_similarities_as_its_source_run(first):
    result, _ = first
    ours = {(r["token"], r["encoder"]): r["sim_i"] for r in result.concepts if r["run"].endswith("/cups") and r["method"] == "conceptexpress"}
    bas = {(r["token"], r["encoder"]): r["sim_i"] for r in result.concepts if r["method"] == "bas-dagger"}
    assert ours.keys() == bas.keys()
    assert all(ours[k] == pytest.approx(bas[k]) for k in ours)  # same tokens, same SAM masks, same images


def test_second_evaluation_reuses_every_cache(dataset, first):
    result, _ = first
    cached = sorted((dataset["runs"]).glob("*/eval/*/**/*.png"))
    stamps = {p: p.stat().st_mtime_ns for p in cached}
    calls: list[str] = []
    again = evaluate_runs(
        [dataset["runs"], dataset["bas"]], _config(dataset["models"]), pipe_loader=_counting_loader(calls),
        out_dir=dataset["root"] / "out2", model_options={"device": "cpu"}, progress=False,
    )
    assert calls == []  # nothing to generate: the base model is not even loaded
    assert {p: p.stat().st_mtime_ns for p in cached} == stamps
    assert again.summary["methods"] == result.summary["methods"]


def test_more_images_only_generates_the_missing_ones(dataset, first):
    run = dataset["runs"] / "toys"
    (gen,) = (run / "eval").glob("generated-*")
    old = gen / "concept_01" / "000.png"
    stamp = old.stat().st_mtime_ns
    calls: list[str] = []
    result = evaluate_runs(
        [run], _config(dataset["models"], images_per_concept=3, encoders="dino"), pipe_loader=_counting_loader(calls),
        out_dir=dataset["root"] / "out3", model_options={"device": "cpu"}, progress=False,
    )
    assert len(calls) == 1 and old.stat().st_mtime_ns == stamp and (gen / "concept_01" / "002.png").is_file()
    assert {r["images"] for r in result.concepts} == {3} and {r["encoder"] for r in result.concepts} == {"dino"}
    assert COLUMNS in result.table and "CLIP" not in result.table


def test_incomplete_and_unfinished_runs_are_skipped_with_a_warning(dataset, first, caplog):
    runs = dataset["root"] / "RUNS-partial"
    shutil.copytree(dataset["runs"] / "toys", runs / "toys")
    shutil.copytree(dataset["runs"] / "cups", runs / "cups-incomplete")
    manifest = json.loads((runs / "cups-incomplete" / "manifest.json").read_text())
    (runs / "cups-incomplete" / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    (runs / "crashed").mkdir()
    with caplog.at_level(logging.WARNING, logger="conceptexpress"):
        result = evaluate_runs([runs], _config(dataset["models"]), out_dir=dataset["root"] / "out4", progress=False,
                               pipe_loader=_counting_loader([]), model_options={"device": "cpu"})
    assert result.summary["num_runs"] == 1
    assert {Path(s["path"]).name for s in result.skipped} == {"cups-incomplete", "crashed"}
    assert "incomplete" in caplog.text and "crashed" in caplog.text


def test_no_run_and_bad_options_fail_in_one_line(dataset, tmp_path):
    with pytest.raises(InputError, match="no finished run"):
        evaluate_runs([tmp_path], _config(dataset["models"]), progress=False)
    with pytest.raises(InputError, match="does not exist"):
        evaluate_runs([tmp_path / "missing"], _config(dataset["models"]), progress=False)
    with pytest.raises(ModelLoadError, match="no such folder"):
        evaluate_runs([dataset["runs"]], _config(dataset["models"], clip=str(tmp_path / "no-clip")), progress=False)
    for bad in (dict(images_per_concept=0), dict(encoders="clip,siglip"), dict(encoders="dino,dino"), dict(guidance=-1.0)):
        with pytest.raises(ConfigError):
            _config(dataset["models"], **bad)
    assert EvalConfig(encoders=("dino", "clip")).encoder_names == ("dino", "clip")
    assert EvalConfig(encoders=" CLIP , dino ").encoders == "clip,dino"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conceptexpress")
    parser.add_argument("-q", "--quiet", action="store_true")
    add_evaluate_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_flags_come_from_the_config(dataset, first, capsys):
    models = dataset["models"]
    out = dataset["root"] / "out-cli"
    args = _parser().parse_args([
        "evaluate", str(dataset["runs"]), "--out", str(out), "--images-per-concept", "2", "--compositional-images", "1",
        "--steps", "2", "--clip", str(models["clip"]), "--dino", str(models["dino"]), "--sam", str(models["sam"]),
        "--encoders", "clip", "--device", "cpu", "--no-crop",
    ])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert COLUMNS in printed and str(out) in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["encoders"] == "clip" and summary["model_options"] == {"device": "cpu"}
    bad = _parser().parse_args(["evaluate", str(dataset["runs"]), "--sam-points", "0"])
    with pytest.raises(ConfigError, match="`sam_points`"):
        bad.func(bad)
