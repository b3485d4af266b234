"""SDXL (and SD 1.x) end to end on the tiny pipelines: `extract` → `generate` → the token file in diffusers'
`StableDiffusionXLPipeline`, determinism on CPU, and bad input refused as on SD 2.x (the user's paths: the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conceptexpress.cli import main

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "coffee.jpg"
FAST = ["--steps", "4", "--merge-step", "2", "--split-tokens", "2", "--sample-count", "1", "--sample-steps", "2"]


def _extract(model: Path, out: Path, *extra: str) -> int:
    return main(["-q", "extract", str(EXAMPLE), "--model", str(model), "--out", str(out), "--device", "cpu", *FAST,
                 *extra])


@pytest.fixture(scope="module")
def run(tiny_sdxl_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("sdxl-run")
    return _extract(tiny_sdxl_dir, out), out


def test_extract_on_sdxl_writes_a_complete_run(run):
    code, out = run
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is True and m["family"] == "sdxl"
    n = m["num_concepts"]
    assert n >= 1 and m["embedding_dim"] == 32 + 48  # the tiny encoders' widths (768 + 1280 at full size)
    for t in m["tokens"]:
        tensors = load_file(out / t["file"])
        assert sorted(tensors) == ["clip_g", "clip_l"]  # the A1111 / ComfyUI / kohya SDXL embedding
        assert tensors["clip_l"].shape == (1, 32) and tensors["clip_g"].shape == (1, 48)
        assert t["a1111_file"] == t["file"]
    assert not (out / "a1111").exists()
    loc = json.loads((out / "localization.json").read_text())
    # Clustering on the finest self-attention grid: latent/2 (the tiny model's 128 px → latent 16 → grid 8).
    assert max(loc["latent_size"]) == 8
    assert len(m["samples"]) == n + 1
    # The whole method ran (DESIGN §9): split tokens (g·N prompts) with the contrastive term, then merged ones
    # (N + the joint prompt); the EMD alignment at latent/4 in both phases.
    history = json.loads((out / "history.json").read_text())
    split = [r for r in history if r["phase"] == "split"]
    merged = [r for r in history if r["phase"] == "merged"]
    assert len(split) == 2 and len(merged) == 2
    assert all(r["prompts"] == 2 * n and r["con"] > 0 and r["reg"] > 0 for r in split)
    assert all(r["prompts"] == n + 1 and r["reg"] > 0 for r in merged)


def test_generate_from_the_sdxl_run(run):
    _, out = run
    code = main(["-q", "generate", str(out), "a photo of <c1>", "-n", "1", "--steps", "2", "--device", "cpu"])
    assert code == 0
    folder = out / "generated" / "a-photo-of-c1"
    assert Image.open(folder / "000.png").size == (128, 128)


def test_the_token_file_loads_into_diffusers_sdxl_pipeline(run, tiny_sdxl_dir):
    """What a diffusers user does with the exported file (docs/sdxl-tokens.md): one load_textual_inversion call per
    text encoder, then the token's rows in both embedding tables are the learned vectors."""
    from diffusers import StableDiffusionXLPipeline

    _, out = run
    m = json.loads((out / "manifest.json").read_text())
    entry = m["tokens"][0]
    state = load_file(out / entry["file"])
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.load_textual_inversion(state["clip_l"], token=entry["token"], text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=entry["token"], text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    for tok, enc, key in ((pipe.tokenizer, pipe.text_encoder, "clip_l"), (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g")):
        row = enc.get_input_embeddings().weight[tok.convert_tokens_to_ids(entry["token"])]
        assert torch.equal(row.detach(), state[key][0])
    images = pipe(f"a photo of {entry['token']}", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 128, 128, 3) and bool(torch.isfinite(torch.from_numpy(images)).all())


def test_sdxl_extraction_is_deterministic_on_cpu(run, tiny_sdxl_dir, tmp_path):
    """Same photo, model and seed → the same masks and the same token vectors (the files' bytes may differ: safetensors
    writes header metadata in hash-map order)."""
    _, out = run
    assert _extract(tiny_sdxl_dir, tmp_path, "--no-samples") == 0
    a = load_file(out / "localization.safetensors")
    b = load_file(tmp_path / "localization.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for t in json.loads((out / "manifest.json").read_text())["tokens"]:
        a, b = load_file(out / t["file"]), load_file(tmp_path / t["file"])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--resolution", "100"], "`--resolution` must be"),
        (["--steps", "0"], "`--steps` must be"),
        (["--lr", "-1"], "`--lr` must be"),
    ],
)
def test_bad_options_on_sdxl_are_one_line_and_write_nothing(tiny_sdxl_dir, tmp_path, capfd, args, needle):
    out = tmp_path / "never"
    code = main(["extract", str(EXAMPLE), "--model", str(tiny_sdxl_dir), "--out", str(out), "--device", "cpu", *args])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_a_bad_photo_on_sdxl_is_one_line_and_writes_nothing(tiny_sdxl_dir, tmp_path, capfd):
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"not a picture")
    out = tmp_path / "never"
    code = main(["extract", str(photo), "--model", str(tiny_sdxl_dir), "--out", str(out), "--device", "cpu"])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1 and "photo.png" in err[0], err
    assert not out.exists()


def test_extract_on_sd1_records_its_family(tiny_sd1_dir, tmp_path):
    """SD 1.x (pads with the end-of-text token): the same run layout as SD 2.x, recorded as family sd1."""
    assert _extract(tiny_sd1_dir, tmp_path, "--no-samples") == 0
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["family"] == "sd1" and m["complete"] is True
    for t in m["tokens"]:
        assert list(load_file(tmp_path / t["file"])) == [t["token"]]
        assert list(load_file(tmp_path / t["a1111_file"])) == ["emb_params"]


def test_evaluate_on_the_sdxl_run(run, tmp_path):
    """`evaluate` reads an SDXL run (its tokens go into both encoders, pooled at the end of text) and scores it."""
    import shutil

    from conceptexpress.evaluate.testing import save_tiny_eval_models

    _, out = run
    runs = tmp_path / "runs"
    shutil.copytree(out, runs / "photo", ignore=shutil.ignore_patterns("generated"))
    models = save_tiny_eval_models(tmp_path / "models")
    code = main(["-q", "evaluate", str(runs), "--out", str(tmp_path / "eval"), "--clip", str(models["clip"]),
                 "--dino", str(models["dino"]), "--sam", str(models["sam"]), "--images-per-concept", "1",
                 "--compositional-images", "1", "--steps", "2", "--device", "cpu"])
    assert code == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert "SIM^I" in json.dumps(summary)
