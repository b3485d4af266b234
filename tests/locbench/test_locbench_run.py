"""End to end: `bench-localize` on synthetic scenes with the tiny random pipeline (outputs, cache, CLI, errors)."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
from PIL import Image

from conceptexpress.cli.bench_localize import add_parser as add_bench_localize_parser
from conceptexpress.config import LocalizeConfig
from conceptexpress.errors import ConfigError, InputError
from conceptexpress.locbench.run import BenchConfig, bench_localize, format_table
from conceptexpress.locbench.scenes import write_synthetic_dataset

METHODS = ["kmeans@2", "kmeans@3", "finch@2", "finch@3", "ours"]
FAST = BenchConfig(ks=(2, 3), kmeans_n_init=2)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_synthetic_dataset(
        tmp_path_factory.mktemp("scenes"), 3, seed=0, size=(96, 96), objects=(2, 3)
    )


class UNetCalls:
    """Counts UNet forward passes of a pipeline while installed."""

    def __init__(self, pipe):
        self.count = 0
        self.handle = pipe.unet.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1

    def remove(self):
        self.handle.remove()


@pytest.fixture(scope="module")
def first_run(tiny_pipe, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    calls = UNetCalls(tiny_pipe)
    try:
        results = bench_localize(dataset, FAST, pipe=tiny_pipe, out_dir=out, progress=False)
    finally:
        calls.remove()
    return out, results, calls.count


def test_outputs(first_run):
    out, results, unet_calls = first_run
    assert unet_calls == 3  # one localization pass per image
    assert {p.name for p in out.iterdir()} >= {"results.json", "table.md", "figure.png", "attention"}
    assert len(list((out / "attention").glob("*.safetensors"))) == 3

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"] == METHODS and on_disk["num_images"] == 3
    assert on_disk["config"]["BenchConfig"]["ks"] == [2, 3]
    assert set(on_disk["summary"]) == set(METHODS)
    for scores in on_disk["summary"].values():
        assert (
            0.0 <= scores["iou"] <= 1.0
            and 0.0 <= scores["recall"] <= 1.0
            and 0.0 <= scores["precision"] <= 1.0
        )
        assert scores["num_images"] == 3
    for image in on_disk["images"]:
        assert set(image["methods"]) == set(METHODS) and image["latent_hw"] == [16, 16]
        assert image["methods"]["kmeans@2"]["num_pred"] <= 2 and image["methods"]["finch@3"]["num_pred"] <= 3

    table = (out / "table.md").read_text()
    assert "| Method | k-means |  | FINCH |  | Ours |" in table
    assert "| #clust | 2 | 3 | 2 | 3 | auto |" in table
    for row in ("| IoU |", "| Recall |", "| Precision |"):
        assert row in table
    assert "**" in table

    with Image.open(out / "figure.png") as fig:
        assert fig.size[0] > 4 * 192 and fig.size[1] > 2 * 192  # 5 columns, 2 rows


def test_rerun_reads_the_attention_cache(tiny_pipe, dataset, first_run):
    out, results, _ = first_run
    calls = UNetCalls(tiny_pipe)
    try:
        again = bench_localize(dataset, FAST, pipe=tiny_pipe, out_dir=out, progress=False)
    finally:
        calls.remove()
    assert calls.count == 0
    assert all(image["attention_cached"] for image in again["images"])
    assert again["summary"] == results["summary"]


def test_cache_is_keyed_on_localization_options(tiny_pipe, dataset, first_run, tmp_path):
    out, _, _ = first_run
    shutil.copytree(out / "attention", tmp_path / "attention")  # leave the shared run's cache alone
    one = BenchConfig(ks=(2,), kmeans_n_init=1, limit=1, figure_rows=0)
    counts = []
    for loc in (LocalizeConfig(), LocalizeConfig(timestep=10)):
        calls = UNetCalls(tiny_pipe)
        try:
            bench_localize(
                dataset, one, pipe=tiny_pipe, localize_config=loc, out_dir=tmp_path, progress=False
            )
        finally:
            calls.remove()
        counts.append(calls.count)
    assert counts == [0, 1]  # same options: cached; another timestep: recomputed


def test_half_precision_cache_gives_the_same_numbers_on_rerun(tiny_pipe, dataset, tmp_path):
    half = BenchConfig(ks=(2,), kmeans_n_init=1, limit=1, figure_rows=0, cache_dtype="float16")
    first = bench_localize(dataset, half, pipe=tiny_pipe, out_dir=tmp_path, progress=False)
    again = bench_localize(dataset, half, pipe=tiny_pipe, out_dir=tmp_path, progress=False)
    assert again["images"][0]["attention_cached"] and again["summary"] == first["summary"]


def test_bench_config():
    assert BenchConfig(ks="7, 4,5").ks == (4, 5, 7)
    assert BenchConfig().ks == (4, 5, 6, 7) and BenchConfig().fig_k == 7
    for bad in ({"ks": "a,b"}, {"ks": "0,3"}, {"iou_threshold": 0}, {"figure_k": 9}, {"cache_dtype": "int8"}):
        with pytest.raises(ConfigError):
            BenchConfig(**bad)


def test_table_marks_best_and_second():
    summary = {
        m: {"iou": v, "recall": 0.5, "precision": 0.5} for m, v in zip(METHODS, [0.1, 0.3, 0.3, 0.2, 0.25])
    }
    summary["ours"].update(num_images=1, num_gt=3, mean_num_pred=2.0)
    row = next(line for line in format_table(summary, (2, 3)).splitlines() if line.startswith("| IoU"))
    assert row == "| IoU | 10.0 | **30.0** | **30.0** | 20.0 | <u>25.0</u> |"


def test_cli_make_synthetic_and_errors(tiny_sd2_dir, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_bench_localize_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "bench-localize",
            str(tmp_path / "ds"),
            "--make-synthetic",
            "1",
            "--ks",
            "2",
            "--kmeans-n-init",
            "1",
            "--model",
            str(tiny_sd2_dir),
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "out"),
            "--n-max",
            "4",
        ]
    )
    assert args.func(args) == 0
    assert "scored 1 image:" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["LocalizeConfig"]["n_max"] == 4 and results["methods"] == [
        "kmeans@2",
        "finch@2",
        "ours",
    ]

    (tmp_path / "bad" / "images").mkdir(parents=True)
    args = parser.parse_args(["bench-localize", str(tmp_path / "bad"), "--model", str(tiny_sd2_dir)])
    with pytest.raises(InputError, match="is empty") as info:
        args.func(args)
    assert "\n" not in str(info.value)
