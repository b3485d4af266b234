"""The browser app's logic without a browser (conceptexpress.ui.session) and the `ui` subcommand's wiring."""

from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conceptexpress.config import ModelConfig, TrainConfig
from conceptexpress.errors import ConfigError, InputError
from conceptexpress.ui.session import Studio, StudioConfig

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "coffee.jpg"
FAST = TrainConfig(steps=4, merge_step=2, split_tokens=2, checkpoint_every=2)


@pytest.fixture(scope="module")
def studio(pipe, tiny_sd2_dir, tmp_path_factory, one_torch_thread):
    config = StudioConfig(model=ModelConfig(model=str(tiny_sd2_dir), device="cpu"),
                          workdir=tmp_path_factory.mktemp("ui"), example=EXAMPLE)
    return Studio(config, pipe=pipe)


def _wait(job, timeout=300):
    assert job.done.wait(timeout), job.status
    return job


def test_the_whole_flow(studio, pipe):
    s = studio.new_session()
    s.set_image(EXAMPLE)
    loc = s.localize()
    n = loc.num_concepts
    assert n >= 3 and (s.run / "localization.json").is_file()
    assert s.edit(merge=[1, 2]) == ["merge 1,2"] and s.loc.num_concepts == n - 1
    w, h = s.loc.source_size
    mask = np.zeros((h, w), dtype=bool)
    mask[: h // 3, : w // 3] = True
    s.edit(mask=mask)
    assert json.loads((s.run / "localization.json").read_text())["edits"] == ["merge 1,2", "add mask 1"]
    job = _wait(s.start_training(FAST, samples=1, sample_steps=2))
    assert job.error is None and job.manifest["num_concepts"] == s.loc.num_concepts
    assert [r["step"] for r in job.records] == [1, 2, 3, 4] and job.status.startswith("done")
    assert len(s.samples()) == s.loc.num_concepts + 1  # each alone, then all together
    paths = s.generate("a photo of <c1> on a table", n=1, steps=2)
    assert len(paths) == 1 and Path(paths[0]).is_file()
    assert "<c1>" not in pipe.tokenizer.get_vocab()  # the shared model goes back as it was
    with zipfile.ZipFile(s.zip()) as z:
        names = set(z.namelist())
    k = s.loc.num_concepts
    assert {"manifest.json", "localization.json", "overlay.png", "concepts/c1.safetensors", "a1111/c1.safetensors",
            "masks/concept_01.png", f"masks/concept_{k:02d}.png"} <= names
    assert not any(n.startswith(("checkpoints/", "backups/")) for n in names)


def test_cancel_leaves_a_resumable_run(studio):
    s = studio.new_session()
    s.set_image(EXAMPLE)
    s.localize()
    config = TrainConfig(steps=40, merge_step=2, split_tokens=2, checkpoint_every=0)
    job = s.start_training(config, samples=0)
    while len(job.records) < 2 and not job.done.is_set():
        job.done.wait(0.05)
    job.cancel()
    _wait(job)
    assert job.cancelled and job.manifest is None and "cancelled at step" in job.status
    stopped = job.records[-1]["step"]
    latest = json.loads((s.run / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == stopped  # saved at the very step it stopped, though checkpoint_every=0
    job2 = s.start_training(config, samples=0)
    while not job2.records and not job2.done.is_set():
        job2.done.wait(0.05)
    job2.cancel()
    _wait(job2)
    assert job2.records[0]["step"] == stopped + 1  # resumed, not restarted


def test_tabs_have_their_own_runs_and_wait_for_the_model(studio):
    a, b = studio.new_session(), studio.new_session()
    assert a.run != b.run and a.run.parent == b.run.parent
    a.set_image(EXAMPLE)
    messages: list[str] = []
    with studio.using_model("training"):
        t = threading.Thread(target=lambda: a.localize(on_wait=messages.append))
        t.start()
        t.join(1.0)
        assert t.is_alive() and messages and "busy (training)" in messages[0]
    t.join(60)
    assert a.loc is not None and not (b.run / "localization.json").exists()
    with pytest.raises(InputError, match="no photo yet"):
        studio.session("not-a-session")


def test_uploads_get_the_cli_checks(studio, tmp_path):
    s = studio.new_session()
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(InputError, match="not an image file"):
        s.set_image(text)
    fake = tmp_path / "fake.png"
    fake.write_bytes(b"not a png")
    with pytest.raises(InputError, match="fake.png"):
        s.set_image(fake)
    small = Studio(StudioConfig(model=studio.config.model, workdir=tmp_path, max_upload_mb=0.001), pipe=studio.pipe)
    with pytest.raises(InputError, match="over the 0.001 MB limit"):
        small.new_session().set_image(EXAMPLE)
    with pytest.raises(InputError, match="find the concepts first"):
        s.image_path = EXAMPLE
        s.edit(drop=[1])
    s.set_image(EXAMPLE)
    s.localize()
    with pytest.raises(ConfigError, match="select concepts first"):
        s.edit()
    with pytest.raises(InputError, match="train first"):
        s.generate("<c1>")


def test_import_does_not_pull_gradio(heavy_imports):
    assert "gradio" not in heavy_imports["ui and cli"]


def test_ui_flags_default_to_localhost_without_sharing():
    from conceptexpress.cli import build_parser

    args = build_parser().parse_args(["ui", "--model", "m"])
    assert args.host == "127.0.0.1" and args.share is False and args.port == 7860


def test_ui_help_states_the_studio_defaults():
    # `ui --help` must not import ui.session (it imports the library), so its defaults are applied in `run` and
    # written in the help text: this keeps the text true.
    from conceptexpress.cli import build_parser
    from conceptexpress.ui.session import StudioConfig

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["ui"]
    helps = {s: a.help for a in sub._actions for s in a.option_strings}
    assert f"(default: {StudioConfig.max_upload_mb:g}," in helps["--max-upload-mb"]
    assert StudioConfig.example.relative_to(StudioConfig.example.parents[1]).as_posix() in helps["--example"]


def test_the_page_builds(studio):
    pytest.importorskip("gradio", reason="the [ui] extra is not installed")
    from conceptexpress.ui.app import build_app

    app = build_app(studio)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"upload", "localize", "concepts", "merge", "drop", "split", "add", "train", "cancel", "loss", "samples",
            "prompt", "generate", "zip", "zip-file"} <= ids


def test_two_tabs_train_one_at_a_time(studio):
    a, b = studio.new_session(), studio.new_session()
    for s in (a, b):
        s.set_image(EXAMPLE)
        s.localize()
    b.edit(drop=[1])  # different concepts in the two runs
    slow = TrainConfig(steps=6, merge_step=2, split_tokens=2, checkpoint_every=0)
    job_a = a.start_training(slow, samples=0)
    while not job_a.records and not job_a.done.is_set():
        job_a.done.wait(0.02)
    job_b = b.start_training(FAST, samples=0)
    seen = set()
    while not job_b.done.is_set():
        seen.add(job_b.status)
        job_b.done.wait(0.02)
    _wait(job_a)
    assert any(s.startswith("waiting: the model is busy (training)") for s in seen), seen
    assert job_a.error is None and job_b.error is None
    ma = json.loads((a.run / "manifest.json").read_text())
    mb = json.loads((b.run / "manifest.json").read_text())
    assert (ma["num_concepts"], mb["num_concepts"]) == (a.loc.num_concepts, b.loc.num_concepts)
    assert ma["num_concepts"] == mb["num_concepts"] + 1 and ma["steps"] == 6 and mb["steps"] == 4


def test_painted_layers_become_a_mask_at_the_photo_size(studio):
    pytest.importorskip("gradio", reason="the [ui] extra is not installed")
    from conceptexpress.ui.app import _drawn_mask

    s = studio.new_session()
    s.set_image(EXAMPLE)
    s.localize()
    w, h = s.loc.source_size
    layer = np.zeros((h // 2, w // 2, 4), dtype=np.uint8)  # the editor may hand back a scaled canvas
    layer[: h // 4, : w // 4, 3] = 255
    mask = _drawn_mask({"background": None, "layers": [layer], "composite": None}, s)
    assert mask.shape == (h, w) and mask[: h // 2 - 2, : w // 2 - 2].all() and not mask[h // 2 + 2:, :].any()
    with pytest.raises(InputError, match="paint a region"):
        _drawn_mask({"background": None, "layers": [], "composite": None}, s)
