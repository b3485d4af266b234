"""`extract-dataset`: listing, sharding, launcher environment, skip / resume / record, and a real 2-process run."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

import conceptexpress.dataset.run as dataset_run  # the names extract_dataset calls: patched here
from conceptexpress.cli.extract_dataset import add_parser as add_extract_dataset_parser
from conceptexpress.config import ModelConfig, RunConfig, TrainConfig
from conceptexpress.dataset import (
    DatasetSummary,
    extract_dataset,
    list_images,
    local_rank_from_env,
    merge_summaries,
    process_model_config,
    shard,
    shard_from_env,
)
from conceptexpress.errors import ConfigError, InputError, ModelLoadError
from conceptexpress.extract import SampleConfig
from conceptexpress.io.run_folder import file_sha256

FAST_TRAIN = TrainConfig(steps=2, merge_step=1, split_tokens=2)
NO_SAMPLES = SampleConfig(samples=False)
GOOD = ("apple.png", "cone.png", "tower.png")


def _photo(kind: int) -> Image.Image:
    """96×96 synthetic photo: two flat coloured shapes on a light background."""
    img = Image.new("RGB", (96, 96), (235, 230, 220))
    d = ImageDraw.Draw(img)
    if kind == 0:
        d.ellipse((8, 10, 44, 46), fill=(200, 30, 30))
        d.rectangle((52, 50, 88, 86), fill=(30, 60, 200))
    elif kind == 1:
        d.polygon([(48, 6), (88, 80), (8, 80)], fill=(20, 160, 60))
        d.ellipse((60, 8, 86, 34), fill=(240, 200, 0))
    else:
        d.rectangle((6, 6, 40, 90), fill=(120, 40, 160))
        d.ellipse((50, 30, 90, 70), fill=(250, 120, 20))
    return img


def _photo_folder(folder: Path, names=GOOD, broken: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, name in enumerate(names):
        _photo(k).save(folder / name)
    if broken:
        (folder / "broken.png").write_bytes(b"\x89PNG garbage, not an image" * 8)
    return folder


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


# ----------------------------------------------------------------------------- list_images
def test_list_images_sorted_filtered_not_recursive(tmp_path):
    names = ["b.PNG", "a.jpg", "c.jpeg", "d.webp", "e.bmp", "f.tif", "g.TIFF", "A.Jpg"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "notes.txt").write_text("no")
    (tmp_path / "._a.png").write_bytes(b"macOS resource fork")  # hidden: ignored
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.png").write_bytes(b"x")  # not recursive
    (tmp_path / "folder.png").mkdir()  # a folder with an image suffix is no image
    got = [p.name for p in list_images(tmp_path)]
    assert got == sorted(names)  # code-point order: "A.Jpg" < "a.jpg" < "b.PNG"
    assert got == [p.name for p in list_images(str(tmp_path))]  # deterministic, str or Path


@pytest.mark.parametrize("case", ["missing", "file", "empty", "no-images"])
def test_list_images_errors_are_one_line(tmp_path, case):
    target = tmp_path / "photos"
    if case == "file":
        target.write_text("x")
    elif case == "empty":
        target.mkdir()
    elif case == "no-images":
        target.mkdir()
        (target / "readme.txt").write_text("x")
        (target / "sub").mkdir()
        (target / "sub" / "x.png").write_bytes(b"x")
    with pytest.raises(InputError) as exc:
        list_images(target)
    assert str(target) in _one_line(exc)


def test_colliding_stems_fail_before_any_work(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for n in ("a.png", "a.jpg", "b.png"):
        (folder / n).write_bytes(b"x")
    runs = tmp_path / "runs"
    with pytest.raises(InputError) as exc:
        extract_dataset(folder, runs, RunConfig(model=ModelConfig(model="/no/such/model")), rank=0, world_size=1)
    msg = _one_line(exc)
    assert "a.jpg" in msg and "a.png" in msg
    assert not runs.exists()  # nothing written, no model loaded


def test_stems_differing_only_in_case_collide(tmp_path):
    for n in ("Cat.png", "cat.jpg"):
        (tmp_path / n).write_bytes(b"x")
    with pytest.raises(InputError, match="Cat.png"):
        extract_dataset(tmp_path, tmp_path / "runs", rank=0, world_size=1)


# ----------------------------------------------------------------------------- shard
@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 3, 7, 10])
def test_shard_covers_every_item_exactly_once(world_size, n):
    items = [f"img{i:02d}" for i in range(n)]
    shards = [shard(items, r, world_size) for r in range(world_size)]
    assert sorted(x for s in shards for x in s) == items
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for r, s in enumerate(shards):
        assert s == [items[i] for i in range(n) if i % world_size == r]  # round-robin by sorted index


@pytest.mark.parametrize(("rank", "world_size"), [(0, 0), (-1, 2), (2, 2), (1, -3), (0.5, 2), (True, 2)])
def test_shard_rejects_bad_rank(rank, world_size):
    with pytest.raises(ConfigError):
        shard([1, 2, 3], rank, world_size)


# ----------------------------------------------------------------------------- launcher environment
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, (0, 1)),
        ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (1, 4)),  # torchrun, accelerate launch
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "3"}, (2, 3)),  # srun
        ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "5", "SLURM_NTASKS": "8"}, (0, 2)),  # torchrun in srun
        ({"RANK": " 3 ", "WORLD_SIZE": "4"}, (3, 4)),
    ],
)
def test_shard_from_env(env, expected):
    assert shard_from_env(env) == expected


@pytest.mark.parametrize(
    "env",
    [
        {"RANK": "x", "WORLD_SIZE": "2"},
        {"RANK": "2", "WORLD_SIZE": "2"},
        {"RANK": "-1", "WORLD_SIZE": "2"},
        {"RANK": "0", "WORLD_SIZE": "0"},
        {"RANK": "0"},
        {"WORLD_SIZE": "2"},
        {"SLURM_PROCID": "0"},
        {"SLURM_PROCID": "4", "SLURM_NTASKS": "4"},
    ],
)
def test_shard_from_env_rejects_bad_values(env):
    with pytest.raises(ConfigError) as exc:
        shard_from_env(env)
    assert any(name in _one_line(exc) for name in env)  # names the variable at fault


def test_shard_from_env_reads_os_environ(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK", "SLURM_LOCALID"):
        monkeypatch.delenv(name, raising=False)
    assert shard_from_env() == (0, 1) and local_rank_from_env() == 0
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert shard_from_env() == (1, 2) and local_rank_from_env() == 1
    assert local_rank_from_env({"SLURM_LOCALID": "3"}) == 3
    with pytest.raises(ConfigError, match="LOCAL_RANK"):
        local_rank_from_env({"LOCAL_RANK": "gpu0"})


def test_each_process_gets_its_local_gpu(monkeypatch, caplog):
    import torch

    auto = ModelConfig(model="m")
    if not torch.cuda.is_available():
        assert process_model_config(auto, world_size=2, local_rank=1) == auto  # CPU only: nothing to place
    picked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", picked.append)
    assert process_model_config(auto, world_size=4, local_rank=1).device == "cuda:1"
    assert process_model_config(ModelConfig(model="m", device="cuda"), world_size=4, local_rank=0).device == "cuda:0"
    assert process_model_config(auto, world_size=4, local_rank=3).device == "cuda:1"  # more processes than GPUs
    assert "share GPUs" in caplog.text
    assert picked == [1, 0, 1]
    for kept in (ModelConfig(model="m", device="cpu"), ModelConfig(model="m", device="cuda:0")):
        assert process_model_config(kept, world_size=4, local_rank=1) == kept  # explicit device: as given
    assert process_model_config(auto, world_size=1, local_rank=0) == auto  # one process: load_pipeline decides


# ----------------------------------------------------------------------------- command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conceptexpress")
    parser.add_argument("-q", "--quiet", action="store_true")
    add_extract_dataset_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_parser_flags_come_from_the_configs():
    args = _parser().parse_args(
        ["extract-dataset", "photos", "--out", "runs", "--steps", "3", "--no-samples", "--n-max", "4",
         "--device", "cpu", "--method", "bas-dagger", "--rank", "1", "--world-size", "2"]
    )
    assert args.folder == "photos" and args.out == Path("runs") and args.method == "bas-dagger"
    assert (args.rank, args.world_size) == (1, 2)
    assert vars(args)["TrainConfig.steps"] == 3 and vars(args)["SampleConfig.samples"] is False
    assert vars(args)["LocalizeConfig.n_max"] == 4 and vars(args)["ModelConfig.device"] == "cpu"
    defaults = _parser().parse_args(["extract-dataset", "photos", "--out", "runs"])
    assert defaults.rank is None and defaults.world_size is None and defaults.method == "conceptexpress"


def test_cli_rank_without_world_size_is_an_error(tmp_path):
    args = _parser().parse_args(["extract-dataset", str(tmp_path), "--out", str(tmp_path / "r"), "--rank", "1"])
    with pytest.raises(ConfigError, match="--world-size"):
        args.func(args)


# ----------------------------------------------------------------------------- fake extract (no model)
def _fake_finished_run(image: Path, out: Path, sample_passes: int = 7) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"complete": True, "image_sha256": file_sha256(image), "sample_passes": sample_passes,
                "num_concepts": 1, "config": {}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_unexpected_exception_is_recorded_and_the_next_photo_runs(tmp_path, monkeypatch, tiny_pipe):
    folder = _photo_folder(tmp_path / "photos", GOOD[:2], broken=False)

    def fake_extract(image, out, config=None, **kw):
        if Path(image).name == "apple.png":
            raise RuntimeError("boom\nsecond line")
        return _fake_finished_run(Path(image), Path(out))

    monkeypatch.setattr(dataset_run, "extract", fake_extract)
    s = extract_dataset(folder, tmp_path / "runs", RunConfig(progress=False), pipe=tiny_pipe, rank=0, world_size=1)
    assert s.failed == ("apple.png",) and s.done == ("cone.png",) and s.sample_passes == 7
    failures = json.loads((tmp_path / "runs" / "failures-rank0.json").read_text())["failures"]
    assert failures == [{"image": str(folder / "apple.png"), "run": str(tmp_path / "runs" / "apple"),
                         "error": "RuntimeError", "message": "boom second line"}]


def test_ctrl_c_stops_the_dataset_and_keeps_finished_runs(tmp_path, monkeypatch, tiny_pipe):
    folder = _photo_folder(tmp_path / "photos", GOOD, broken=False)
    calls, interrupt_at = [], ["cone.png"]

    def fake_extract(image, out, config=None, **kw):
        calls.append(Path(image).name)
        if Path(image).name in interrupt_at:
            raise KeyboardInterrupt
        return _fake_finished_run(Path(image), Path(out))

    monkeypatch.setattr(dataset_run, "extract", fake_extract)
    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        extract_dataset(folder, runs, RunConfig(progress=False), pipe=tiny_pipe, rank=0, world_size=1)
    assert calls == ["apple.png", "cone.png"]  # tower.png never started
    summary = json.loads((runs / "summary-rank0.json").read_text())
    assert summary["interrupted"] is True and summary["done"] == ["apple.png"] and summary["failed"] == []

    calls.clear()
    interrupt_at.clear()
    s = extract_dataset(folder, runs, RunConfig(progress=False), pipe=tiny_pipe, rank=0, world_size=1)  # the same command
    assert calls == ["cone.png", "tower.png"] and s.skipped == ("apple.png",) and s.ok


@pytest.mark.parametrize("method", ["conceptexpress", "bas-dagger"])
def test_skipping_a_run_made_with_other_options_warns(tmp_path, caplog, method):
    from dataclasses import replace

    from conceptexpress.config import LocalizeConfig, config_dict

    folder = _photo_folder(tmp_path / "photos", GOOD[:2], broken=False)
    model = ModelConfig(model="unused", device="cpu")
    used = replace(FAST_TRAIN, split_merge=False, contrastive=False) if method == "bas-dagger" else FAST_TRAIN
    for name, train in (("apple.png", used), ("cone.png", replace(used, steps=9))):
        manifest = _fake_finished_run(folder / name, tmp_path / "runs" / Path(name).stem)
        manifest.update(method=method, config=config_dict(model, LocalizeConfig(), train, NO_SAMPLES))
        (tmp_path / "runs" / Path(name).stem / "manifest.json").write_text(json.dumps(manifest))
    s = extract_dataset(folder, tmp_path / "runs", RunConfig(model=model, train=FAST_TRAIN, method=method, progress=False), rank=0, world_size=1)
    assert s.skipped == GOOD[:2]
    assert "apple.png: skipped" not in caplog.text  # the options the method forces are no difference
    assert "cone.png: skipped, finished with other options (TrainConfig)" in caplog.text


def test_model_that_does_not_load_is_raised_not_recorded(tmp_path):
    folder = _photo_folder(tmp_path / "photos", GOOD[:1], broken=False)
    with pytest.raises(ModelLoadError):
        extract_dataset(folder, tmp_path / "runs", RunConfig(model=ModelConfig(model="/no/such/model", device="cpu"), progress=False), rank=0, world_size=1)


def test_bad_method_fails_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="method"):
        extract_dataset(tmp_path / "nowhere", tmp_path / "runs", RunConfig(method="dreambooth"))


# ----------------------------------------------------------------------------- the tiny model, end to end
@pytest.fixture(scope="module")
def first_run(tiny_sd2_dir, tmp_path_factory):
    """3 good photos + broken.png through extract_dataset once (one process, model loaded by it)."""
    root = tmp_path_factory.mktemp("dataset")
    folder = _photo_folder(root / "photos")
    runs = root / "runs"
    summary = extract_dataset(folder, runs, RunConfig(model=ModelConfig(model=str(tiny_sd2_dir), device="cpu"), train=FAST_TRAIN, sample=NO_SAMPLES, progress=False), rank=0, world_size=1)
    return folder, runs, summary


def _spy(monkeypatch):
    """Record every extract(...) call (image name, resume) and every load_pipeline call; run the real ones."""
    calls, loads = [], []
    real_extract, real_load = dataset_run.extract, dataset_run.load_pipeline

    def spy_extract(image, out, config, **kw):
        calls.append((Path(image).name, config.resume))
        return real_extract(image, out, config, **kw)

    def spy_load(*a, **kw):
        loads.append(a)
        return real_load(*a, **kw)

    monkeypatch.setattr(dataset_run, "extract", spy_extract)
    monkeypatch.setattr(dataset_run, "load_pipeline", spy_load)
    return calls, loads


def _copy_runs(runs: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs, tmp_path / "runs"))


def test_three_done_one_failed(first_run):
    folder, runs, s = first_run
    assert isinstance(s, DatasetSummary)
    assert s.done == GOOD and s.failed == ("broken.png",) and s.skipped == () and s.resumed == ()
    assert s.images == 4 and not s.ok and not s.interrupted
    manifests = [json.loads((runs / Path(n).stem / "manifest.json").read_text()) for n in GOOD]
    assert all(m["complete"] is True for m in manifests)
    assert s.sample_passes == s.sample_passes_total == sum(m["sample_passes"] for m in manifests) > 0
    assert not (runs / "broken").exists()
    failures = json.loads((runs / "failures-rank0.json").read_text())["failures"]
    assert [(f["image"], f["error"]) for f in failures] == [(str(folder / "broken.png"), "InputError")]
    assert "\n" not in failures[0]["message"] and "broken.png" in failures[0]["message"]
    written = json.loads((runs / "summary-rank0.json").read_text())
    assert written["counts"] == {"done": 3, "skipped": 0, "failed": 1} and written["done"] == list(GOOD)
    assert "3 done, 0 skipped, 1 failed (broken.png) of 4 images" in s.line()


def test_rerun_skips_finished_runs_without_loading_the_model(first_run, tmp_path, monkeypatch, tiny_sd2_dir):
    folder, runs, first = first_run
    runs = _copy_runs(runs, tmp_path)
    calls, loads = _spy(monkeypatch)
    s = extract_dataset(folder, runs, RunConfig(model=ModelConfig(model=str(tiny_sd2_dir), device="cpu"), train=FAST_TRAIN, sample=NO_SAMPLES, progress=False), rank=0, world_size=1)
    assert s.skipped == GOOD and s.done == () and s.failed == ("broken.png",)
    assert calls == [] and loads == []  # the broken photo fails its cheap check; nothing needs the model
    assert s.sample_passes == 0 and s.sample_passes_total == first.sample_passes


def test_half_finished_run_is_resumed(first_run, tmp_path, monkeypatch, tiny_sd2_dir):
    folder, runs, _ = first_run
    runs = _copy_runs(runs, tmp_path)
    (runs / "cone" / "manifest.json").unlink()  # interrupted after training: localization + checkpoints stay
    stamp = (runs / "cone" / "localization.safetensors").stat().st_mtime_ns
    calls, loads = _spy(monkeypatch)
    s = extract_dataset(folder, runs, RunConfig(model=ModelConfig(model=str(tiny_sd2_dir), device="cpu"), train=FAST_TRAIN, sample=NO_SAMPLES, progress=False), rank=0, world_size=1)
    assert calls == [("cone.png", True)] and len(loads) == 1
    assert s.done == ("cone.png",) and s.resumed == ("cone.png",) and s.skipped == ("apple.png", "tower.png")
    m = json.loads((runs / "cone" / "manifest.json").read_text())
    assert m["complete"] is True and m["steps"] == 2
    assert (runs / "cone" / "localization.safetensors").stat().st_mtime_ns == stamp  # reused, not recomputed


def test_finished_run_of_another_image_is_an_error_not_a_skip(first_run, tmp_path, monkeypatch):
    _, runs, _ = first_run
    runs = _copy_runs(runs, tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _photo(2).save(other / "apple.png")  # same name, different pixels
    before = (runs / "apple" / "manifest.json").read_bytes()
    calls, loads = _spy(monkeypatch)
    s = extract_dataset(other, runs, RunConfig(progress=False), rank=0, world_size=1)
    assert s.failed == ("apple.png",) and calls == [] and loads == []
    failure = json.loads((runs / "failures-rank0.json").read_text())["failures"][0]
    assert failure["error"] == "OutputError" and "another image" in failure["message"]
    assert (runs / "apple" / "manifest.json").read_bytes() == before  # untouched


def test_overwrite_replaces_runs_of_other_options_and_other_images(first_run, tmp_path, monkeypatch, tiny_sd2_dir):
    """Issue 11: a finished run with other options is skipped and a half-finished one fails (exit-5 message);
    with ``overwrite=True`` both, and a run of another image, are replaced by a new run."""
    from dataclasses import replace

    folder, runs, _ = first_run
    runs = _copy_runs(runs, tmp_path)
    (runs / "cone" / "manifest.json").unlink()  # half-finished
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    _photo(0).save(other / "tower.png")  # same name, different pixels (apple's)
    model, train = ModelConfig(model=str(tiny_sd2_dir), device="cpu"), replace(FAST_TRAIN, steps=3)
    config = RunConfig(model=model, train=train, sample=NO_SAMPLES, progress=False)
    s = extract_dataset(other, runs, config, rank=0, world_size=1)
    assert s.skipped == ("apple.png",) and s.failed == ("broken.png", "cone.png", "tower.png")
    failures = {Path(f["image"]).name: f for f in json.loads((runs / "failures-rank0.json").read_text())["failures"]}
    assert "other options" in failures["cone.png"]["message"] and failures["cone.png"]["error"] == "OutputError"
    calls, _ = _spy(monkeypatch)
    s = extract_dataset(other, runs, replace(config, overwrite=True), rank=0, world_size=1)
    assert calls == [("apple.png", False), ("cone.png", True), ("tower.png", False)]
    assert s.done == GOOD and s.failed == ("broken.png",)
    for name in ("apple", "cone", "tower"):
        m = json.loads((runs / name / "manifest.json").read_text())
        assert m["steps"] == 3 and m["config"]["TrainConfig"]["steps"] == 3
    assert json.loads((runs / "tower" / "manifest.json").read_text())["image_sha256"] == file_sha256(other / "tower.png")


def test_cli_exit_code_is_1_when_a_photo_failed(first_run, tmp_path, capsys, caplog):
    folder, runs, _ = first_run
    runs = _copy_runs(runs, tmp_path)
    args = _parser().parse_args(["-q", "extract-dataset", str(folder), "--out", str(runs), "--rank", "0",
                                 "--world-size", "1", "--steps", "2", "--merge-step", "1", "--split-tokens", "2"])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "0 done, 3 skipped, 1 failed (broken.png)" in out and "failures-rank0.json" in out
    assert "0 done, 3 skipped" not in caplog.text  # printed once, not logged as well
    assert "broken.png: failed" in caplog.text


def test_each_photo_starts_from_the_pristine_pipeline(tmp_path, monkeypatch, tiny_pipe):
    """extract's samples load <c1>… into the shared pipeline; the next photo must not find them there."""
    folder = _photo_folder(tmp_path / "photos", GOOD[:2], broken=False)
    tokenizer_size = len(tiny_pipe.tokenizer)
    embeddings = tiny_pipe.text_encoder.get_input_embeddings()
    rows = embeddings.weight.detach().clone()
    seen = []
    real_extract = dataset_run.extract

    def spy_extract(image, out, config, **kw):
        seen.append(("<c1>" in kw["pipe"].tokenizer.get_vocab(), len(kw["pipe"].tokenizer)))
        return real_extract(image, out, config, **kw)

    monkeypatch.setattr(dataset_run, "extract", spy_extract)
    s = extract_dataset(folder, tmp_path / "runs", RunConfig(model=ModelConfig(model="unused", device="cpu"), train=FAST_TRAIN, sample=SampleConfig(sample_count=1, sample_steps=2), progress=False), pipe=tiny_pipe, rank=0, world_size=1)
    assert s.done == GOOD[:2]
    assert seen == [(False, tokenizer_size)] * 2
    assert len(tiny_pipe.tokenizer) == tokenizer_size
    assert tiny_pipe.text_encoder.get_input_embeddings() is embeddings
    assert embeddings.num_embeddings == rows.shape[0] and embeddings.weight.equal(rows)  # resized in place, restored
    assert all((tmp_path / "runs" / Path(n).stem / "samples").is_dir() for n in GOOD[:2])


# ----------------------------------------------------------------------------- two processes under torchrun
# Runs the real command line when the lead has wired `extract-dataset` into conceptexpress.cli, and otherwise
# the same flags through a parser of its own, so the test holds before and after the wiring.
_ENTRY = textwrap.dedent(
    """
    import argparse, sys
    from conceptexpress import cli
    from conceptexpress.errors import ConceptExpressError

    def wired():
        actions = [a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
        return any("extract-dataset" in a.choices for a in actions)

    if wired():
        sys.exit(cli.main())
    from conceptexpress.cli.extract_dataset import add_parser as add_extract_dataset_parser
    parser = argparse.ArgumentParser(prog="conceptexpress")
    parser.add_argument("-q", "--quiet", action="store_true")
    add_extract_dataset_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args()
    try:
        sys.exit(args.func(args))
    except ConceptExpressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_under_torchrun(tiny_sd2_dir, tmp_path):
    folder = _photo_folder(tmp_path / "photos")  # apple, broken, cone, tower: rank 0 apple+cone, rank 1 the rest
    runs = tmp_path / "runs"
    entry = tmp_path / "entry.py"
    entry.write_text(_ENTRY)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"):
        env.pop(name, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
         str(entry), "-q", "extract-dataset", str(folder), "--out", str(runs), "--model", str(tiny_sd2_dir),
         "--device", "cpu", "--steps", "2", "--merge-step", "1", "--split-tokens", "2", "--no-samples"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    # broken.png failed in rank 1, yet every process exits 0: a non-zero exit would make torchrun kill rank 0.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "rank 1/2:" in proc.stdout and "1 failed (broken.png)" in proc.stdout
    for name in GOOD:
        assert json.loads((runs / Path(name).stem / "manifest.json").read_text())["complete"] is True
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == ["apple", "cone", "tower"]
    ranks = [json.loads((runs / f"summary-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["done"] == ["apple.png", "cone.png"] and ranks[1]["done"] == ["tower.png"]
    listed = [n for s in ranks for key in ("done", "skipped", "failed") for n in s[key]]
    assert sorted(listed) == sorted([*GOOD, "broken.png"])  # each image once, in one shard
    merged = merge_summaries(runs)
    assert merged["world_size"] == 2 and merged["missing_ranks"] == [] and merged["failed"] == ["broken.png"]
    assert merged["failures_files"] == [str(runs / "failures-rank1.json")]
    assert json.loads((runs / "failures-rank0.json").read_text())["failures"] == []
