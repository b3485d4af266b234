"""Token files against their real clients (diffusers, the A1111 / ComfyUI layout), and generation from a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conceptexpress.cli.generate import add_parser as add_generate_parser
from conceptexpress.embeddings import load_tokens_into, read_token_embeddings
from conceptexpress.errors import ConfigError, InputError
from conceptexpress.export import token_stem, write_token_files
from conceptexpress.generate import (
    GenerateConfig,
    expand_prompt,
    generate_from_run,
    image_grid,
    prompt_folders,
    prompt_slug,
)
from conceptexpress.io.run_folder import read_manifest

TOKENS = ["<c1>", "<c2>"]


def _text_width(model_dir: Path) -> int:
    return json.loads((model_dir / "text_encoder" / "config.json").read_text())["hidden_size"]


def make_run(run: Path, model_dir: Path, *, seed: int = 0, complete: bool = True) -> torch.Tensor:
    """A run folder as the trainer writes it: token files + manifest.json; returns the (N, D) embeddings."""
    emb = torch.randn(len(TOKENS), _text_width(model_dir), generator=torch.Generator().manual_seed(seed))
    entries = write_token_files(run, TOKENS, emb)
    for i, e in enumerate(entries):
        e["mask"] = f"masks/concept_{i + 1:02d}.png"
    manifest = {
        "format": "conceptexpress-run-1",
        "base_model": str(model_dir),
        "single_file_config": None,
        "tokens": entries,
        "num_vectors": 1,
        "embedding_dim": emb.shape[1],
        "seed": 0,
        "complete": complete,
    }
    (run / "manifest.json").write_text(json.dumps(manifest))
    return emb


@pytest.fixture(scope="module")
def run_sd2(tiny_sd2_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run-sd2")
    return run, make_run(run, tiny_sd2_dir)


@pytest.fixture(scope="module")
def loaded_pipe(tiny_sd2_dir, run_sd2):
    """One tiny pipeline with the run's tokens, shared by the generation tests (no model reloads)."""
    from conceptexpress.models import load_pipeline

    pipe = load_pipeline(str(tiny_sd2_dir), device="cpu")
    load_tokens_into(pipe, run_sd2[0])
    return pipe


@pytest.fixture(autouse=True)
def _no_pickles(monkeypatch):
    """Nothing in these paths may unpickle: any torch.load call fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.load was called; pickles must never be loaded")

    monkeypatch.setattr(torch, "load", refuse)


def _fresh(model_dir):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _encode(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pipe.encode_prompt(prompt, "cpu", 1, False)[0]  # (1, 77, D)


# ----------------------------------------------------------------------------- (1) diffusers is a real client
@pytest.mark.parametrize("family", ["sd2", "sd1"])
def test_diffusers_loads_exported_file(family, tiny_sd2_dir, tiny_sd1_dir, tmp_path):
    model_dir = tiny_sd2_dir if family == "sd2" else tiny_sd1_dir
    emb = make_run(tmp_path / "a", model_dir, seed=1)
    other = make_run(tmp_path / "b", model_dir, seed=2)

    pipe = _fresh(model_dir)
    before = _encode(pipe, "a photo of")
    # diffusers' own loader, default arguments: the file's single key names the token.
    pipe.load_textual_inversion(str(tmp_path / "a" / "concepts" / "c1.safetensors"))
    ids = pipe.tokenizer("a photo of <c1>", add_special_tokens=False).input_ids
    token_id = pipe.tokenizer.convert_tokens_to_ids("<c1>")
    assert token_id in ids and ids.count(token_id) == 1  # one token, not spelled out in characters
    row = pipe.text_encoder.get_input_embeddings().weight[token_id]
    assert torch.equal(row, emb[0])

    with_c1 = _encode(pipe, "a photo of <c1>")
    assert not torch.allclose(with_c1, before)
    pipe_b = _fresh(model_dir)
    pipe_b.load_textual_inversion(str(tmp_path / "b" / "concepts" / "c1.safetensors"))
    assert torch.equal(pipe_b.text_encoder.get_input_embeddings().weight[token_id], other[0])
    assert not torch.allclose(_encode(pipe_b, "a photo of <c1>"), with_c1)  # the embedding drives the encoding

    # The A1111 file loads in diffusers too once the token is named (its key is "emb_params").
    pipe_c = _fresh(model_dir)
    pipe_c.load_textual_inversion(str(tmp_path / "a" / "a1111" / "c1.safetensors"), token="<c1>")
    assert torch.equal(_encode(pipe_c, "a photo of <c1>"), with_c1)


def test_load_tokens_into_skips_same_and_refuses_different(tiny_sd2_dir, run_sd2, tmp_path):
    run, emb = run_sd2
    pipe = _fresh(tiny_sd2_dir)
    assert load_tokens_into(pipe, run) == TOKENS
    vocab = len(pipe.tokenizer)
    assert load_tokens_into(pipe, run) == TOKENS  # same embeddings: skipped, nothing added twice
    assert len(pipe.tokenizer) == vocab
    for i, t in enumerate(TOKENS):
        assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids(t)], emb[i])

    make_run(tmp_path / "other", tiny_sd2_dir, seed=5)
    with pytest.raises(InputError, match="'<c1>' is already in the pipeline's tokenizer with a different embedding"):
        load_tokens_into(pipe, tmp_path / "other")


def test_load_tokens_into_fp16_and_multi_vector(tiny_sd2_dir, tmp_path):
    from conceptexpress.models import load_pipeline

    run = tmp_path / "run"
    emb = torch.randn(1, 2, 32)  # one token of two vectors: diffusers adds "<m1>" and "<m1>_1"
    entries = write_token_files(run, ["<m1>"], emb)
    assert load_file(run / entries[0]["file"])["<m1>"].shape == (2, 32)
    (run / "manifest.json").write_text(
        json.dumps({"format": "conceptexpress-run-1", "base_model": "x", "complete": True, "tokens": entries})
    )
    pipe = load_pipeline(str(tiny_sd2_dir), device="cpu", dtype="fp16")  # rows are stored in fp16
    assert load_tokens_into(pipe, run) == ["<m1>"]
    vocab = pipe.tokenizer.get_vocab()
    assert "<m1>" in vocab and "<m1>_1" in vocab
    assert load_tokens_into(pipe, run) == ["<m1>"]  # fp16 rows still count as the same embedding
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[vocab["<m1>_1"]], emb[0, 1].half())
    assert pipe.maybe_convert_prompt("a <m1>", pipe.tokenizer) == "a <m1> <m1>_1"


def test_load_tokens_into_wrong_width(tiny_sd2_dir, tmp_path):
    run = tmp_path / "run"
    write_token_files(run, ["<c1>"], torch.randn(1, 16))
    (run / "manifest.json").write_text(
        json.dumps({"format": "conceptexpress-run-1", "base_model": "x", "complete": True,
                    "tokens": [{"token": "<c1>", "index": 0, "file": "concepts/c1.safetensors"}]})
    )
    with pytest.raises(InputError, match="width 16 but the pipeline's text encoder has width 32"):
        load_tokens_into(_fresh(tiny_sd2_dir), run)


# ----------------------------------------------------------------------------- (2) the files themselves
def test_file_formats(run_sd2):
    run, emb = run_sd2
    manifest = read_manifest(run)
    assert [e["file"] for e in manifest["tokens"]] == ["concepts/c1.safetensors", "concepts/c2.safetensors"]
    for i, entry in enumerate(manifest["tokens"]):
        diffusers_file = load_file(run / entry["file"])
        assert list(diffusers_file) == [entry["token"]] and diffusers_file[entry["token"]].shape == (1, emb.shape[1])
        a1111 = load_file(run / entry["a1111_file"])
        assert list(a1111) == ["emb_params"]
        assert a1111["emb_params"].shape == (1, emb.shape[1]) and a1111["emb_params"].dtype == torch.float32
        assert torch.equal(a1111["emb_params"][0], emb[i])
        # ComfyUI's rule for a file without string_to_param / clip_l: the first tensor; A1111: the only one.
        assert torch.equal(next(iter(a1111.values())), diffusers_file[entry["token"]])
    got = read_token_embeddings(run)
    assert list(got) == TOKENS and all(torch.equal(got[t][0], emb[i]) for i, t in enumerate(TOKENS))


def test_token_stems_and_collisions(tmp_path):
    assert token_stem("<c1>") == "c1"
    assert token_stem('<a:b/c\\d|e?f*g"h>') == "abcdefgh"
    assert token_stem("<con>") == "con_"  # a Windows device name
    with pytest.raises(ValueError, match="no usable file name"):
        token_stem("<..>")
    with pytest.raises(ValueError, match="map to the same file name 'c1'"):
        write_token_files(tmp_path, ["<c1>", "c1"], torch.zeros(2, 4))
    with pytest.raises(ValueError, match="same file name"):
        write_token_files(tmp_path, ["<C1>", "<c1>"], torch.zeros(2, 4))  # case-insensitive file systems
    with pytest.raises(ValueError, match="N = 2 tokens"):
        write_token_files(tmp_path, ["<a>", "<b>"], torch.zeros(3, 4))
    with pytest.raises(ValueError, match="NaN"):
        write_token_files(tmp_path, ["<a>"], torch.full((1, 4), float("nan")))
    assert not any(tmp_path.rglob("*.safetensors"))  # every check runs before the first write


# ----------------------------------------------------------------------------- (3) generation
def test_expand_prompt():
    assert expand_prompt("all", TOKENS) == "a photo of <c1> and <c2>"
    assert expand_prompt(" <c2> ", TOKENS) == "a photo of <c2>"
    assert expand_prompt("a <c1> on a beach", TOKENS) == "a <c1> on a beach"
    with pytest.raises(ConfigError, match=r"names <c7>, which the run does not have; its tokens are <c1>, <c2>"):
        expand_prompt("a photo of <c7>", TOKENS)
    with pytest.raises(ConfigError, match="non-empty"):
        expand_prompt("  ", TOKENS)


def test_config_validation():
    for kwargs, name in [({"n": 0}, "`n`"), ({"steps": 0}, "`steps`"), ({"guidance": -1.0}, "`guidance`"),
                         ({"height": 100}, "`height`"), ({"seed": -1}, "`seed`"), ({"n": True}, "`n`")]:
        with pytest.raises(ConfigError, match=name):
            GenerateConfig(**kwargs)


def test_default_sampler_is_the_released_one():
    from conceptexpress.models.family import SD1, SD2, SDXL

    cfg = GenerateConfig()
    assert (cfg.scheduler, cfg.steps, cfg.guidance, cfg.seed) == (None, 50, None, 0)  # None: the family's
    for family in (SD1, SD2):  # the released sampler for the paper's models
        assert (cfg.for_family(family).scheduler, cfg.for_family(family).guidance) == ("ddim", 7.5)
    assert (cfg.for_family(SDXL).scheduler, cfg.for_family(SDXL).guidance) == ("euler", 5.0)  # SDXL's own
    given = GenerateConfig(scheduler="pndm", guidance=3.0)
    assert (given.for_family(SDXL).scheduler, given.for_family(SDXL).guidance) == ("pndm", 3.0)
    assert cfg.height is None and cfg.width is None  # the model's native size
    from conceptexpress.extract import SampleConfig

    assert (SampleConfig().sample_scheduler, SampleConfig().sample_steps) == (None, 50)
    with pytest.raises(ConfigError, match="`scheduler` must be one of ddim, pipeline"):
        GenerateConfig(scheduler="lms")


def test_sampler_is_ddim_from_the_pipeline_config_and_restored(loaded_pipe):
    from diffusers import DDIMScheduler

    from conceptexpress.generate import generate, sampler_record
    from conceptexpress.sampler import build_scheduler, using_scheduler

    own = loaded_pipe.scheduler
    ddim = build_scheduler(own, "ddim")
    assert isinstance(ddim, DDIMScheduler) and ddim.config.clip_sample is False and ddim.config.set_alpha_to_one is False
    for key in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "prediction_type", "steps_offset"):
        assert ddim.config[key] == own.config[key]  # the model's own training schedule
    assert ddim.config.beta_schedule == "scaled_linear"
    assert build_scheduler(own, "pipeline") is own

    seen = []
    original_call = type(loaded_pipe).__call__

    def spy(self, *args, **kwargs):
        seen.append((type(self.scheduler).__name__, kwargs["num_inference_steps"], kwargs["guidance_scale"]))
        return original_call(self, *args, **kwargs)

    import unittest.mock

    with unittest.mock.patch.object(type(loaded_pipe), "__call__", spy):
        generate(loaded_pipe, ["a photo of <c1>"], GenerateConfig(n=1, steps=2, height=64, width=64))
        generate(loaded_pipe, ["a photo of <c1>"], GenerateConfig(n=1, steps=2, height=64, width=64, scheduler="euler"))
    assert seen == [("DDIMScheduler", 2, 7.5), ("EulerDiscreteScheduler", 2, 7.5)]
    assert loaded_pipe.scheduler is own  # the caller's scheduler is back
    with pytest.raises(RuntimeError, match="boom"), using_scheduler(loaded_pipe, "ddim"):
        raise RuntimeError("boom")
    assert loaded_pipe.scheduler is own  # also after an error
    record = sampler_record(loaded_pipe, GenerateConfig())
    assert record["scheduler"] == "ddim" and record["class"] == "DDIMScheduler"
    assert (record["steps"], record["guidance"]) == (50, 7.5)
    assert record["config"]["clip_sample"] is False and record["config"]["set_alpha_to_one"] is False
    native = loaded_pipe.unet.config.sample_size * loaded_pipe.vae_scale_factor
    assert record["size"] == [native, native]


def test_generate_from_run(run_sd2, loaded_pipe, tmp_path):
    run, _ = run_sd2
    cfg = GenerateConfig(n=2, steps=2, height=64, width=64, seed=3)
    root = generate_from_run(run, ["all", "<c2>"], cfg, pipe=loaded_pipe, out_dir=tmp_path / "a")
    folders = prompt_folders(root, ["a photo of <c1> and <c2>", "a photo of <c2>"])
    assert [f.name for f in folders] == ["a-photo-of-c1-and-c2", "a-photo-of-c2"]
    for folder in folders:
        assert sorted(p.name for p in folder.iterdir()) == ["000.png", "001.png", "generation.json", "grid.png"]
        assert Image.open(folder / "000.png").size == (64, 64)
        assert Image.open(folder / "grid.png").size == (128, 64)
        record = json.loads((folder / "generation.json").read_text())
        assert record["seeds"] == [3, 4] and record["config"]["n"] == 2
        assert record["sampler"]["class"] == "DDIMScheduler" and record["sampler"]["steps"] == 2

    again = generate_from_run(run, ["<c2>"], cfg, pipe=loaded_pipe, out_dir=tmp_path / "b")
    other = generate_from_run(run, ["<c2>"], GenerateConfig(n=2, steps=2, height=64, width=64, seed=4),
                              pipe=loaded_pipe, out_dir=tmp_path / "c")

    def pixels(r, i):
        return np.asarray(Image.open(r / "a-photo-of-c2" / f"{i:03d}.png"))

    assert np.array_equal(pixels(root, 0), pixels(again, 0)) and np.array_equal(pixels(root, 1), pixels(again, 1))
    assert not np.array_equal(pixels(root, 0), pixels(other, 0))
    # Image i uses seed + i whatever the batch: seed 4's first image is seed 3's second one.
    assert np.abs(pixels(root, 1).astype(int) - pixels(other, 0).astype(int)).max() <= 2

    with pytest.raises(ConfigError, match="<c9>"):
        generate_from_run(run, ["a photo of <c9>"], cfg, pipe=loaded_pipe, out_dir=tmp_path / "d")
    assert not (tmp_path / "d").exists()  # rejected before anything is written


def test_slugs_are_safe_and_unique(tmp_path):
    assert prompt_slug("A Photo of <C1>, on the BEACH!") == "a-photo-of-c1-on-the-beach"
    assert prompt_slug("***") == "prompt" and prompt_slug("nul") == "nul-"
    long_a, long_b = "x " * 50 + "cat", "x " * 50 + "dog"
    assert len(prompt_slug(long_a)) <= 60
    a, b = prompt_folders(tmp_path, [long_a, long_b])
    assert a != b and a.parent == b.parent == tmp_path
    # A folder whose record names another prompt is never reused.
    a.mkdir()
    (a / "generation.json").write_text(json.dumps({"prompt": long_b}))
    assert prompt_folders(tmp_path, [long_a])[0] != a and prompt_folders(tmp_path, [long_b])[0] == a


def test_image_grid():
    ims = [Image.new("RGB", (10, 8), (i * 40, 0, 0)) for i in range(5)]
    g = image_grid(ims)
    assert g.size == (30, 16)  # 3 columns, 2 rows
    assert g.getpixel((10, 8)) == (160, 0, 0) and g.getpixel((25, 12)) == (0, 0, 0)
    assert image_grid(ims, cols=5).size == (50, 8)
    with pytest.raises(ValueError, match="at least one image"):
        image_grid([])


# ----------------------------------------------------------------------------- (4) the command line
def _parser():
    parser = argparse.ArgumentParser(prog="conceptexpress")
    add_generate_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_generate(run_sd2, tmp_path, capsys):
    run, _ = run_sd2
    args = _parser().parse_args(
        ["generate", str(run), "<c1>", "-n", "1", "--steps", "1", "--height", "64", "--width", "64",
         "--seed", "7", "--guidance", "1.5", "--out", str(tmp_path / "out"), "--device", "cpu", "--dtype", "fp32"]
    )
    assert args.func(args) == 0
    folder = tmp_path / "out" / "a-photo-of-c1"
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "generation.json", "grid.png"]
    record = json.loads((folder / "generation.json").read_text())
    assert record["config"]["seed"] == 7 and record["config"]["guidance"] == 1.5
    assert record["model"] == read_manifest(run)["base_model"]  # default model: the run's
    assert str(folder) in capsys.readouterr().out


def test_cli_flags_come_from_config():
    args = _parser().parse_args(["generate", "RUN", "all", "--n", "3", "--negative-prompt", "blurry"])
    from conceptexpress.cli import config_from_args

    cfg = config_from_args(args, GenerateConfig)
    assert cfg == GenerateConfig(n=3, negative_prompt="blurry")
    assert config_from_args(_parser().parse_args(["generate", "RUN", "all"]), GenerateConfig) == GenerateConfig()


def test_cli_main_if_wired(run_sd2, tmp_path, capsys):
    from conceptexpress.cli import build_parser, main

    if "generate" not in build_parser()._subparsers._group_actions[0].choices:
        pytest.skip("`generate` is not wired into conceptexpress.cli yet")
    run, _ = run_sd2
    code = main(["-q", "generate", str(run), "<c9>", "--out", str(tmp_path)])
    assert code == ConfigError.exit_code and "<c9>" in capsys.readouterr().err


# ----------------------------------------------------------------------------- (5) bad run folders
def test_bad_run_folders(tiny_sd2_dir, tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"not a finished run \(no manifest.json\)") as exc:
        read_token_embeddings(empty)
    assert "\n" not in str(exc.value)

    half = tmp_path / "half"
    make_run(half, tiny_sd2_dir, complete=False)
    with pytest.raises(InputError, match='incomplete \\(manifest has "complete": False\\)') as exc:
        read_token_embeddings(half)
    assert "\n" not in str(exc.value)
    m = json.loads((half / "manifest.json").read_text())
    del m["complete"]
    (half / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="absent"):
        generate_from_run(half, ["all"], pipe=object())

    broken = tmp_path / "broken"
    make_run(broken, tiny_sd2_dir)
    (broken / "concepts" / "c2.safetensors").unlink()
    with pytest.raises(InputError, match="'<c2>': file .*c2.safetensors' is missing") as exc:
        read_token_embeddings(broken)
    assert "\n" not in str(exc.value)

    pickled = tmp_path / "pickled"
    make_run(pickled, tiny_sd2_dir)
    m = json.loads((pickled / "manifest.json").read_text())
    m["tokens"][0]["file"] = "concepts/c1.bin"
    (pickled / "concepts" / "c1.bin").write_bytes(b"not read")
    (pickled / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="not a .safetensors file; pickles are never loaded"):
        read_token_embeddings(pickled)

    (tmp_path / "bad" ).mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(InputError, match="is damaged \\(not valid JSON"):
        read_manifest(tmp_path / "bad")


def test_generate_from_run_hands_the_pipeline_back_as_it_found_it(run_sd2, tiny_sd2_dir, tmp_path):
    from conceptexpress.models import load_pipeline

    pipe = load_pipeline(str(tiny_sd2_dir), device="cpu")
    vocab = dict(pipe.tokenizer.get_vocab())
    rows = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    generate_from_run(run_sd2[0], ["all"], GenerateConfig(n=1, steps=1, height=64, width=64), pipe=pipe,
                      out_dir=tmp_path / "g")
    assert pipe.tokenizer.get_vocab() == vocab  # the run's tokens were added for the call only
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, rows)


def test_no_pickle_loading_in_sources():
    import conceptexpress.export as export
    import conceptexpress.generate as generate
    import conceptexpress.io.run_folder as run_folder

    for module in (export, generate, run_folder):
        assert "torch.load(" not in Path(module.__file__).read_text()
