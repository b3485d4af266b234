"""`conceptexpress extract` then `generate` on the tiny model and the example photo (the README path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from safetensors.torch import load_file

from conceptexpress.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "coffee.jpg"
FAST = ["--steps", "4", "--merge-step", "2", "--split-tokens", "2", "--sample-count", "1", "--sample-steps", "2"]


@pytest.fixture(scope="module")
def run(tiny_sd2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["-q", "extract", str(EXAMPLE), "--model", str(tiny_sd2_dir), "--out", str(out), "--device", "cpu", *FAST])
    return code, out


def test_extract_writes_a_complete_run(run):
    code, out = run
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    n = m["num_concepts"]
    assert m["complete"] is True and len(m["tokens"]) == n >= 1
    assert m["sample_passes"] == 2 * 2 * n + 2 * (n + 1)  # split: g·N prompts, merged: N + joint
    assert m["released_code_sample_passes"] == 2 * (2 * 2 * n + 2 * (n + 1))
    for t in m["tokens"]:
        tensors = load_file(out / t["file"])
        assert list(tensors) == [t["token"]]
        assert list(load_file(out / t["a1111_file"])) == ["emb_params"]
        assert (out / t["mask"]).is_file()
    for name in ("overlay.png", "loss.png", "history.json", "localization.json"):
        assert (out / name).is_file()
    assert len(m["samples"]) == n + 1  # each concept alone and all together
    assert m["config"]["TrainConfig"]["steps"] == 4 and m["seed"] == 0
    assert "torch" in m["versions"] and "diffusers" in m["versions"]


def test_generate_from_the_run(run, capsys):
    _, out = run
    code = main(["generate", str(out), "a photo of <c1> on the beach", "-n", "2", "--steps", "2", "--device", "cpu"])
    assert code == 0
    folder = out / "generated" / "a-photo-of-c1-on-the-beach"
    assert (folder / "grid.png").is_file() and len(list(folder.glob("0*.png"))) == 2
    assert Image.open(folder / "000.png").size == (128, 128)


def test_rerun_reuses_localization_and_resume_continues(run, tiny_sd2_dir, capsys):
    _, out = run
    stamp = (out / "localization.safetensors").stat().st_mtime_ns
    args = ["-q", "extract", str(EXAMPLE), "--model", str(tiny_sd2_dir), "--out", str(out), "--device", "cpu"]
    code = main([*args, *FAST, "--resume", "--no-samples"])
    assert code == 0
    assert (out / "localization.safetensors").stat().st_mtime_ns == stamp  # computed once, read back
    m = json.loads((out / "manifest.json").read_text())
    assert m["steps"] == 4  # the finished checkpoint was resumed: nothing recomputed or lost


def test_bad_training_option_is_one_line(capsys, tmp_path):
    code = main(["extract", str(EXAMPLE), "--out", str(tmp_path / "o"), "--steps", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "`--steps`" in err
    assert not (tmp_path / "o").exists()


def test_samples_leave_the_shared_pipeline_as_it_was(tiny_sd2_dir, tmp_path):
    """Sampling loads the new tokens into the pipeline already in memory, then unloads them (datasets reuse it)."""
    from conceptexpress import TrainConfig, extract_concepts, load_pipeline
    from conceptexpress.config import RunConfig
    from conceptexpress.extract import SampleConfig

    pipe = load_pipeline(str(tiny_sd2_dir), device="cpu")
    vocab, rows = len(pipe.tokenizer), pipe.text_encoder.get_input_embeddings().weight.shape[0]
    fast = TrainConfig(steps=2, merge_step=1, split_tokens=2)
    samples = SampleConfig(sample_count=1, sample_steps=1)
    for out in ("a", "b"):  # the second run learns tokens of the same names: no clash, no stale embedding
        m = extract_concepts(EXAMPLE, tmp_path / out, RunConfig(train=fast, sample=samples, progress=False), pipe=pipe)
        assert m["complete"] and m["samples"]
        # The released sampler by default, recorded in the manifest; the pipeline keeps its own scheduler.
        assert m["sampler"]["class"] == "DDIMScheduler" and m["sampler"]["scheduler"] == "ddim"
        assert (m["sampler"]["steps"], m["sampler"]["guidance"]) == (1, 7.5)
        assert m["config"]["SampleConfig"]["sample_scheduler"] == "ddim"
        assert type(pipe.scheduler).__name__ == "PNDMScheduler"
        assert m["skipped_steps"] == 0  # fp32 on CPU: no loss scaling
        # A caller's pipeline without a ModelConfig: the manifest names the model it came from, not the default.
        assert m["base_model"] == str(Path(tiny_sd2_dir).resolve())
        assert len(pipe.tokenizer) == vocab and "<c1>" not in pipe.tokenizer.get_vocab()
        assert pipe.text_encoder.get_input_embeddings().weight.shape[0] == rows
