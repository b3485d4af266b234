"""Run folders that cannot lie (issue 11): every file a run reads is checked, a rerun is a resume or a new run.

One real run on the tiny model is made per module; each test damages a copy of it. The classes (docs/inputs.md,
"Run-folder guarantees"): damaged localization → recomputed; damaged checkpoint → the previous one or a restart;
damaged manifest or token file → one-line error naming the file (exit 3); a JSON entry leading out of the folder
→ refused; a rerun with other options → refused (exit 5) unless ``--overwrite``. Never exit 1.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conceptexpress.cli import main
from conceptexpress.embeddings import read_token_embeddings
from conceptexpress.errors import InputError, OutputError, RunFolderError
from conceptexpress.io.run_folder import (
    file_sha256,
    read_localization,
    read_manifest,
    read_safetensors_checked,
    resolve_inside,
)
from conceptexpress.learn.checkpoint import load_checkpoint

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "coffee.jpg"
FAST = ["--steps", "4", "--merge-step", "2", "--split-tokens", "2", "--checkpoint-every", "2",
        "--sample-count", "1", "--sample-steps", "1"]


@pytest.fixture(scope="module")
def base_run(tiny_sd2_dir, tmp_path_factory, one_torch_thread):
    out = tmp_path_factory.mktemp("base") / "run"
    assert _extract(tiny_sd2_dir, out) == 0
    return out


def _extract(model_dir, out, *extra: str, fast=FAST) -> int:
    return main(["-q", "extract", str(EXAMPLE), "--model", str(model_dir), "--out", str(out), "--device", "cpu",
                 *fast, *extra])


@pytest.fixture
def run(base_run, tmp_path):
    """A fresh copy of the finished run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garble(path: Path) -> None:
    """Same length, header intact, the last bytes of the tensor data inverted: only the SHA-256 can tell."""
    data = bytearray(path.read_bytes())
    data[-16:] = bytes(255 - b for b in data[-16:])
    path.write_bytes(bytes(data))


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _one_line_error(capsys, code: int, *, exit_code: int, names: str) -> str:
    err = capsys.readouterr().err
    assert code == exit_code, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "internal error" not in err, err
    assert names in err, err
    return err


# ----------------------------------------------------------------------------- resolve_inside, tensor headers
def test_resolve_inside_refuses_paths_leaving_the_folder(tmp_path):
    run = tmp_path / "run"
    (run / "concepts").mkdir(parents=True)
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    assert resolve_inside(run, "concepts/c1.safetensors", source="m") == (run / "concepts/c1.safetensors").resolve()
    for rel in ("../outside.safetensors", "concepts/../../outside.safetensors", str(tmp_path / "outside.safetensors"),
                "/etc/passwd", "", 3, None, "C:/x"):
        with pytest.raises(RunFolderError, match="m"):
            resolve_inside(run, rel, source="m")
    (run / "concepts" / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(RunFolderError, match="symlink"):
        resolve_inside(run, "concepts/link.safetensors", source="m")


def test_read_safetensors_checked_refuses_bad_files(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.zeros(2, 3), "b": torch.zeros(4, dtype=torch.uint8)}, path)
    sha = file_sha256(path)
    want = {"a": ((2, None), torch.float32), "b": ((4,), torch.uint8)}
    assert set(read_safetensors_checked(path, sha256=sha, expected=want)) == {"a", "b"}
    with pytest.raises(RunFolderError, match="shape"):
        read_safetensors_checked(path, expected={"a": ((3, None), torch.float32)})
    with pytest.raises(RunFolderError, match="dtype F32, expected U8"):
        read_safetensors_checked(path, expected={"a": ((2, 3), torch.uint8)})
    with pytest.raises(RunFolderError, match="no tensor 'c'"):
        read_safetensors_checked(path, expected={"c": (None, None)})
    _garble(path)
    with pytest.raises(RunFolderError, match="SHA-256 differs"):
        read_safetensors_checked(path, sha256=sha)
    _truncate(path)
    with pytest.raises(RunFolderError, match="is damaged"):
        read_safetensors_checked(path)
    path.write_bytes(b"garbage" * 5)
    with pytest.raises(RunFolderError, match="is damaged"):
        read_safetensors_checked(path)


# ----------------------------------------------------------------------------- localization: recomputed
@pytest.mark.parametrize("damage", ["truncated", "garbled", "wrong_shape", "json_garbled", "json_wrong_type"])
def test_damaged_localization_is_recomputed(run, tiny_sd2_dir, damage, caplog):
    tensors, meta = run / "localization.safetensors", run / "localization.json"
    good = tensors.read_bytes()
    if damage == "truncated":
        _truncate(tensors)
    elif damage == "garbled":
        _garble(tensors)
    elif damage == "wrong_shape":
        save_file({k: v[..., :-1].contiguous() for k, v in read_localization(run)[1].items()}, tensors)
        _edit_json(meta, lambda m: m.pop("tensors_sha256"))  # only the shape check can tell
    elif damage == "json_garbled":
        meta.write_text(meta.read_text()[:40])
    else:
        _edit_json(meta, lambda m: m.update(latent_size="16x16"))
    with caplog.at_level(logging.WARNING):
        code = _extract(tiny_sd2_dir, run, "--resume", "--no-samples")
    assert code == 0
    assert "recomputing the localization" in caplog.text and "localization." in caplog.text
    assert tensors.read_bytes() == good  # recomputed (the same bytes), not reused
    read_localization(run)  # and it passes every check again


def test_localization_entries_leading_outside_are_refused(run, tmp_path, tiny_sd2_dir, caplog):
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(run / "localization.safetensors", outside)
    _edit_json(run / "localization.json", lambda m: m.update(tensors=f"../{outside.name}"))
    with pytest.raises(RunFolderError, match="outside the run folder"):
        read_localization(run)
    _edit_json(run / "localization.json", lambda m: m.update(tensors="localization.safetensors"))
    _edit_json(run / "localization.json", lambda m: m["masks"].__setitem__(0, "/etc/passwd"))
    with pytest.raises(RunFolderError, match="outside the run folder"):
        read_localization(run)
    # extract does not read it either: it recomputes the localization
    with caplog.at_level(logging.WARNING):
        assert _extract(tiny_sd2_dir, run, "--resume", "--no-samples") == 0
    assert "outside the run folder" in caplog.text
    assert json.loads((run / "localization.json").read_text())["masks"][0] == "masks/concept_01.png"


# ----------------------------------------------------------------------------- checkpoints: previous or restart
def test_checkpoint_records_sha_and_keeps_the_previous(base_run):
    latest = json.loads((base_run / "checkpoints" / "latest.json").read_text())
    previous = json.loads((base_run / "checkpoints" / "previous.json").read_text())
    assert (latest["step"], previous["step"]) == (4, 2)
    assert latest["sha256"] == file_sha256(base_run / "checkpoints" / latest["tensors"])
    assert sorted(p.name for p in (base_run / "checkpoints").glob("step-*")) == [previous["tensors"], latest["tensors"]]


@pytest.mark.parametrize("damage", ["truncated", "garbled", "json_garbled", "json_wrong_type", "outside"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(run, tmp_path, damage, caplog):
    folder = run / "checkpoints"
    latest = json.loads((folder / "latest.json").read_text())
    if damage == "truncated":
        _truncate(folder / latest["tensors"])
    elif damage == "garbled":
        _garble(folder / latest["tensors"])
    elif damage == "json_garbled":
        (folder / "latest.json").write_text('{"step": 4, "tens')
    elif damage == "json_wrong_type":
        _edit_json(folder / "latest.json", lambda m: m.update(history="none"))
    else:  # a valid checkpoint outside the folder, its SHA-256 recorded: still not read
        shutil.copy(folder / latest["tensors"], tmp_path / "foreign.safetensors")
        _edit_json(folder / "latest.json", lambda m: m.update(tensors="../../foreign.safetensors"))
    with caplog.at_level(logging.WARNING):
        state = load_checkpoint(folder)
    assert state is not None and state.step == 2
    assert "resuming from the one before, step 2" in caplog.text
    assert "latest.json" in caplog.text or latest["tensors"] in caplog.text  # the damaged file is named


def test_checkpoint_written_after_a_fallback_keeps_the_good_one(run):
    """Resumed from previous.json because latest.json was garbled: the next checkpoint keeps that good one."""
    from conceptexpress.learn.checkpoint import save_checkpoint

    folder = run / "checkpoints"
    (folder / "latest.json").write_text("{garbled")
    state = load_checkpoint(folder)
    assert state.step == 2
    state.step = 3
    save_checkpoint(folder, state)
    _truncate(folder / "step-000003.safetensors")
    assert load_checkpoint(folder).step == 2  # the fallback still has its file


def test_damaged_checkpoint_without_previous_starts_over(run, tiny_sd2_dir, caplog):
    folder = run / "checkpoints"
    _truncate(folder / json.loads((folder / "latest.json").read_text())["tensors"])
    (folder / "previous.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert load_checkpoint(folder) is None
    assert "training starts over" in caplog.text and "step-000004.safetensors" in caplog.text
    # End to end: `extract --resume` warns and retrains instead of exiting 1.
    with caplog.at_level(logging.WARNING):
        assert _extract(tiny_sd2_dir, run, "--resume", "--no-samples") == 0
    assert read_manifest(run)["steps"] == 4


def test_resume_after_damaged_latest_checkpoint_cli(run, tiny_sd2_dir, caplog):
    (run / "checkpoints" / "latest.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert _extract(tiny_sd2_dir, run, "--resume", "--no-samples") == 0
    assert "resuming from the one before, step 2" in caplog.text
    m = read_manifest(run)
    assert m["steps"] == 4 and m["complete"]


# ----------------------------------------------------------------------------- manifest and tokens: clear errors
MANIFEST_DAMAGE = {
    "garbled_json": lambda run: (run / "manifest.json").write_text('{"format": "conceptexpress-run-1", "tok'),
    "not_an_object": lambda run: (run / "manifest.json").write_text("[1, 2]"),
    "tokens_wrong_type": lambda run: _edit_json(run / "manifest.json", lambda m: m.update(tokens="<c1>")),
    "base_model_wrong_type": lambda run: _edit_json(run / "manifest.json", lambda m: m.update(base_model=5)),
    "embedding_dim_wrong_type": lambda run: _edit_json(run / "manifest.json", lambda m: m.update(embedding_dim="x")),
    "complete_wrong_type": lambda run: _edit_json(run / "manifest.json", lambda m: m.update(complete="yes")),
    "duplicate_token": lambda run: _edit_json(
        run / "manifest.json", lambda m: m.update(tokens=[m["tokens"][0], dict(m["tokens"][0])], num_concepts=2)),
    "token_file_outside": lambda run: _edit_json(
        run / "manifest.json", lambda m: m["tokens"][0].update(file="../outside.safetensors")),
    "a1111_file_outside": lambda run: _edit_json(
        run / "manifest.json", lambda m: m["tokens"][0].update(a1111_file="/etc/passwd")),
    "mask_outside": lambda run: _edit_json(
        run / "manifest.json", lambda m: m["tokens"][0].update(mask="../../mask.png")),
    "sample_outside": lambda run: _edit_json(
        run / "manifest.json", lambda m: m.update(samples={"a photo of <c1>": ["../x.png"]})),
    "token_file_truncated": lambda run: _truncate(run / "concepts" / "c1.safetensors"),
    "token_file_garbled": lambda run: _garble(run / "concepts" / "c1.safetensors"),
    "token_file_wrong_dtype": lambda run: (
        save_file({"<c1>": torch.zeros(1, 32, dtype=torch.int64)}, run / "concepts" / "c1.safetensors"),
        _edit_json(run / "manifest.json", lambda m: m["tokens"][0].pop("sha256"))),
}


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_damaged_manifest_or_token_file_is_a_one_line_error(run, tmp_path, damage, capsys):
    # A valid token file outside the folder: it must not be read through the manifest.
    shutil.copy(run / "concepts" / "c1.safetensors", run.parent / "outside.safetensors")
    MANIFEST_DAMAGE[damage](run)
    with pytest.raises(RunFolderError):
        read_token_embeddings(run)
    code = main(["-q", "generate", str(run), "a photo of <c1>", "-n", "1", "--steps", "1", "--device", "cpu",
                 "--out", str(tmp_path / "g")])
    err = _one_line_error(capsys, code, exit_code=RunFolderError.exit_code, names=str(run))
    assert "manifest.json" in err or "c1.safetensors" in err


def test_evaluate_skips_a_run_whose_mask_leads_outside(run):
    from conceptexpress.evaluate.runs import _check_run

    _edit_json(run / "manifest.json", lambda m: m["tokens"][0].update(mask="../../mask.png"))
    with pytest.raises(InputError, match="outside the run folder"):
        _check_run(run, "run")


def test_evaluate_refuses_a_run_whose_mask_leads_outside_in_one_stderr_line(run):
    """Issue 26: the refusal was a "skipping …" warning and then "error: no finished run …" (two lines, the second
    hiding the reason). A fresh process, so the command line's own logging setup is what writes stderr; one process
    runs both commands (the run itself, and a RUNS folder whose only run is refused), each stderr read apart."""
    import subprocess
    import sys

    _edit_json(run / "manifest.json", lambda m: m["tokens"][0].update(mask="../../mask.png"))
    script = (
        "import sys\n"
        "from conceptexpress.cli import main\n"
        "for target in sys.argv[1:]:\n"
        "    code = main(['evaluate', target, '--device', 'cpu'])\n"
        "    sys.stderr.write(f'<<exit {code}>>\\n')\n"
        "    sys.stderr.flush()\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(run), str(run.parent)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=300)
    parts = proc.stderr.split(f"<<exit {RunFolderError.exit_code}>>\n")
    assert len(parts) == 3 and parts[2] == "", proc.stderr  # both commands exited with the run-folder error's code
    for err in parts[:2]:
        assert err.startswith("error: ") and err.count("\n") == 1, proc.stderr
        assert "outside the run folder" in err and "skipping" not in err, proc.stderr


def test_evaluate_refusing_every_run_of_a_dataset_says_why_in_one_error(run, caplog):
    from conceptexpress.evaluate.runs import discover_runs

    _edit_json(run / "manifest.json", lambda m: m["tokens"][0].update(mask="../../mask.png"))
    (run.parent / "crashed").mkdir()
    with caplog.at_level(logging.WARNING, logger="conceptexpress"), pytest.raises(InputError) as info:
        discover_runs([run.parent])
    message = str(info.value)
    assert "2 run folders skipped" in message and "outside the run folder" in message and "crashed" in message
    assert "\n" not in message and "skipping" not in caplog.text


def test_the_run_holds_its_source_photo_and_evaluate_reads_that_copy(run, tmp_path):
    """The photo's bytes are copied into the run (``source.jpg``); evaluation reads the copy, so it works with the
    original gone and never reads the path ``"image"`` names."""
    from conceptexpress.evaluate.runs import _check_run, load_source

    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["source_image"] == "source.jpg"
    assert file_sha256(run / "source.jpg") == manifest["image_sha256"] == file_sha256(EXAMPLE)
    _edit_json(run / "manifest.json", lambda m: m.update(image=str(tmp_path / "gone.jpg")))  # the original moved
    checked = _check_run(run, "run")
    assert checked.image == (run / "source.jpg").resolve()
    assert load_source(checked).size == (600, 400)


@pytest.mark.parametrize("rel", ["../source.jpg", "/etc/hostname"])
def test_a_source_copy_outside_the_folder_is_refused(run, rel):
    from conceptexpress.evaluate.runs import _check_run

    shutil.copy(EXAMPLE, run.parent / "source.jpg")
    _edit_json(run / "manifest.json", lambda m: m.update(source_image=rel))
    with pytest.raises(InputError, match="outside the run folder|absolute"):
        _check_run(run, "run")


def test_a_changed_source_copy_is_refused(run):
    from conceptexpress.evaluate.runs import _check_run

    _garble(run / "source.jpg")
    with pytest.raises(InputError, match="changed since extraction"):
        _check_run(run, "run")


def test_fine_tuned_pipeline_outside_the_folder_is_refused(run, tiny_sd2_dir):
    """A bas-ft manifest names its own pipeline relative to the run; `../model` must not load another model."""
    from conceptexpress.generate import run_model_config

    shutil.copytree(tiny_sd2_dir, run.parent / "other-model")
    _edit_json(run / "manifest.json", lambda m: m.update(base_model="../other-model", fine_tune={"steps": 1}))
    with pytest.raises(RunFolderError, match="outside the run folder"):
        run_model_config(read_manifest(run), run_dir=run)


# ----------------------------------------------------------------------------- a rerun: resume or new, never a mix
OTHER = ["--steps", "2", "--merge-step", "1", "--split-tokens", "2", "--checkpoint-every", "2", "--no-samples"]


def _listed_and_present(run: Path) -> tuple[set[str], set[str]]:
    m = read_manifest(run)
    listed = {e[k] for e in m.tokens for k in ("file", "a1111_file")}
    listed |= {f for files in (m.get("samples") or {}).values() for f in files}
    present = {str(p.relative_to(run)) for d in ("concepts", "a1111", "samples") for p in (run / d).glob("*")}
    return listed, present


@pytest.mark.parametrize("resume", [False, True])
def test_rerun_with_other_options_refuses(run, tiny_sd2_dir, capsys, resume):
    before = (run / "manifest.json").read_bytes()
    code = _extract(tiny_sd2_dir, run, *(["--resume"] if resume else []), fast=OTHER)
    _one_line_error(capsys, code, exit_code=OutputError.exit_code, names="TrainConfig.steps 4 → 2")
    assert (run / "manifest.json").read_bytes() == before  # the old run is left whole


@pytest.mark.parametrize("resume", [False, True])
def test_overwrite_replaces_the_old_run_entirely(run, tiny_sd2_dir, resume):
    # Outputs of the old run that the new one will not write: a concept that no longer exists, generated images.
    for rel in ("concepts/c9.safetensors", "a1111/c9.safetensors", "samples/c9_00.png", "generated/x/000.png"):
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"old")
    stamp = (run / "localization.safetensors").stat().st_mtime_ns
    assert _extract(tiny_sd2_dir, run, "--overwrite", *(["--resume"] if resume else []), fast=OTHER) == 0
    m = read_manifest(run)
    assert m["steps"] == 2 and m["samples"] == {}
    listed, present = _listed_and_present(run)
    assert listed == present  # nothing beside the manifest that it does not list
    assert not (run / "generated").exists() and not list(run.glob(".old-run-*"))
    assert (run / "localization.safetensors").stat().st_mtime_ns == stamp  # same localization options: reused
    assert json.loads((run / "run.json").read_text())["config"]["TrainConfig"]["steps"] == 2


def test_rerun_with_same_options_is_a_new_run(run, tiny_sd2_dir):
    (run / "samples" / "c9_00.png").write_bytes(b"old")
    assert _extract(tiny_sd2_dir, run) == 0
    listed, present = _listed_and_present(run)
    assert listed == present


def test_resume_redraws_the_samples_without_leaving_old_ones(run, tiny_sd2_dir):
    (run / "samples" / "c1_05.png").write_bytes(b"old")  # e.g. drawn with a larger --sample-count
    assert _extract(tiny_sd2_dir, run, "--resume", "--no-samples") == 0
    listed, present = _listed_and_present(run)
    assert listed == present and read_manifest(run)["steps"] == 4


def test_run_options_beside_nothing_trained_do_not_block(run, tiny_sd2_dir):
    """A run that stopped before training (e.g. its model did not load) holds only run.json: no run to protect."""
    for name in ("manifest.json", "checkpoints", "concepts", "a1111", "samples", "history.json", "loss.png"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    assert _extract(tiny_sd2_dir, run, fast=OTHER) == 0


def test_damaged_run_options_need_overwrite(run, tiny_sd2_dir, capsys):
    (run / "run.json").write_text("{garbled")
    code = _extract(tiny_sd2_dir, run, "--resume", "--no-samples")
    _one_line_error(capsys, code, exit_code=RunFolderError.exit_code, names="run.json")
    assert _extract(tiny_sd2_dir, run, "--overwrite", fast=OTHER) == 0


def test_legacy_run_without_run_json_is_compared_by_its_manifest(run, tiny_sd2_dir, capsys):
    (run / "run.json").unlink()
    code = _extract(tiny_sd2_dir, run, fast=OTHER)
    _one_line_error(capsys, code, exit_code=OutputError.exit_code, names="TrainConfig.steps 4 → 2")


def _localize(model_dir, out, *extra: str) -> int:
    return main(["-q", "localize", str(EXAMPLE), "--model", str(model_dir), "--out", str(out), "--device", "cpu",
                 "--n-max", "4", *extra])


def test_localize_under_a_trained_run_refuses(run, tiny_sd2_dir, capsys):
    """`localize` into a run folder would put new masks under the old tokens: refused (exit 5), nothing touched."""
    def files():  # the lock file is touched by taking the lock; everything else must be as it was
        return {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != ".lock"}

    before = files()
    code = _localize(tiny_sd2_dir, run)
    _one_line_error(capsys, code, exit_code=OutputError.exit_code, names="--overwrite")
    assert files() == before


def test_localize_overwrite_replaces_the_trained_run(run, tiny_sd2_dir):
    assert _localize(tiny_sd2_dir, run, "--overwrite") == 0
    assert not any((run / name).exists() for name in ("manifest.json", "run.json", "concepts", "checkpoints", "samples"))
    assert json.loads((run / "localization.json").read_text())["config"]["LocalizeConfig"]["n_max"] == 4
    assert not list(run.glob(".old-run-*"))


def test_localize_on_a_locked_folder_is_refused(tmp_path, tiny_sd2_dir, capsys):
    from conceptexpress.io.lock import run_lock

    out = tmp_path / "loc"
    with run_lock(out):
        code = _localize(tiny_sd2_dir, out)
    _one_line_error(capsys, code, exit_code=5, names=str(out))
    assert not (out / "localization.json").exists()
