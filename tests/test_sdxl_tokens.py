"""SDXL tokens on the use side: the {clip_l, clip_g} file, loading into both encoders, generation's pooled embedding.

The tiny SDXL pipeline is the shared fixture (``conceptexpress.testing.save_tiny_sdxl_pipeline``), loaded as a user's.
"""

from __future__ import annotations

import hashlib
import json
import re
import unittest.mock
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conceptexpress.config import GenerateConfig
from conceptexpress.embeddings import load_tokens_into, read_token_embeddings, run_tokens
from conceptexpress.errors import InputError
from conceptexpress.export import read_token_file, write_token_files
from conceptexpress.generate import generate, generate_from_run, text_embeddings

ROOT = Path(__file__).resolve().parents[1]
TOKENS = ["<c1>", "<c2>"]
DIMS = (32, 48)  # the tiny fixture's clip_l, clip_g widths (768, 1280 at full size)
KEYS = ("clip_l", "clip_g")


@pytest.fixture
def tiny_sdxl(tiny_sdxl_dir):
    """The shared tiny SDXL pipeline (widths 32 / 48, encoder 2 with the legacy eos_token_id 2), freshly loaded
    through ``load_pipeline`` (tests add and remove tokens)."""
    from conceptexpress.models import load_pipeline

    return load_pipeline(str(tiny_sdxl_dir), device="cpu")


def _snapshot(pipe):
    return [(dict(tok.get_vocab()), enc.get_input_embeddings().weight.detach().clone())
            for tok, enc in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2))]


def _same(a, b) -> bool:
    return all(va == vb and torch.equal(wa, wb) for (va, wa), (vb, wb) in zip(a, b))


def make_sdxl_run(run: Path, *, seed: int = 0, num_vectors: int = 1) -> torch.Tensor:
    """A run folder of SDXL tokens as extract writes it; returns the (N, V, 32 + 48) concatenated vectors."""
    emb = torch.randn(len(TOKENS), num_vectors, sum(DIMS), generator=torch.Generator().manual_seed(seed))
    entries = write_token_files(run, TOKENS, emb, keys=KEYS, dims=DIMS)
    manifest = {"format": "conceptexpress-run-1", "base_model": "tiny-sdxl", "family": "sdxl", "tokens": entries,
                "embedding_dim": sum(DIMS), "complete": True}
    (run / "manifest.json").write_text(json.dumps(manifest))
    return emb


# ----------------------------------------------------------------------------- (1) the file
def test_sdxl_export_round_trip(tmp_path):
    emb = make_sdxl_run(tmp_path / "run", num_vectors=2)
    run = tmp_path / "run"
    entries = json.loads((run / "manifest.json").read_text())["tokens"]
    assert not (run / "a1111").exists()  # one file serves diffusers (split), A1111, ComfyUI and kohya
    for i, entry in enumerate(entries):
        assert entry["file"] == entry["a1111_file"] == f"concepts/c{i + 1}.safetensors"
        data = (run / entry["file"]).read_bytes()
        assert entry["sha256"] == entry["a1111_sha256"] == hashlib.sha256(data).hexdigest()
        state = load_file(run / entry["file"])
        assert sorted(state) == ["clip_g", "clip_l"]
        assert state["clip_l"].shape == (2, 32) and state["clip_g"].shape == (2, 48)
        assert state["clip_l"].dtype == state["clip_g"].dtype == torch.float32
        assert torch.equal(state["clip_l"], emb[i, :, :32]) and torch.equal(state["clip_g"], emb[i, :, 32:])
        parts = read_token_file(run / entry["file"], entry["token"], sha256=entry["sha256"])
        assert [p.shape for p in parts] == [(2, 32), (2, 48)]  # encoder order, whatever the file's key order
    got = read_token_embeddings(run)
    assert list(got) == TOKENS and all(torch.equal(got[t], emb[i]) for i, t in enumerate(TOKENS))

    # SD callers are unchanged by default: one key, two files.
    sd = write_token_files(tmp_path / "sd", ["<c1>"], torch.zeros(1, 8))
    assert sd[0]["a1111_file"] == "a1111/c1.safetensors" and list(load_file(tmp_path / "sd" / sd[0]["file"])) == ["<c1>"]
    with pytest.raises(ValueError, match="`dims`"):
        write_token_files(tmp_path / "x", ["<c1>"], torch.zeros(1, 80), keys=KEYS)
    with pytest.raises(ValueError, match="sum to D = 80"):
        write_token_files(tmp_path / "x", ["<c1>"], torch.zeros(1, 80), keys=KEYS, dims=(32, 32))
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- (2) loading into both encoders
def test_run_tokens_loads_both_encoders_and_unloads(tiny_sdxl, tmp_path):
    pipe = tiny_sdxl
    emb = make_sdxl_run(tmp_path / "run")
    before = _snapshot(pipe)
    with run_tokens(pipe, tmp_path / "run") as names:
        assert names == TOKENS
        for tok, enc, part in ((pipe.tokenizer, pipe.text_encoder, emb[..., :32]),
                               (pipe.tokenizer_2, pipe.text_encoder_2, emb[..., 32:])):
            ids = [tok.convert_tokens_to_ids(t) for t in TOKENS]
            assert ids == [len(before[0][0]), len(before[0][0]) + 1]  # added after the vocabulary: the highest ids
            assert torch.equal(enc.get_input_embeddings().weight[ids], part[:, 0])
        assert load_tokens_into(pipe, tmp_path / "run") == TOKENS  # same vectors: skipped
        make_sdxl_run(tmp_path / "other", seed=3)
        with pytest.raises(InputError, match="'<c1>' is already in the pipeline's tokenizer with a different"):
            load_tokens_into(pipe, tmp_path / "other")
    assert _same(_snapshot(pipe), before)  # both tokenizers and embedding tables as they were

    # in memory: concatenated (V, 80) or one tensor per encoder
    with run_tokens(pipe, {"<a>": emb[0], "<b>": (emb[1, :, :32], emb[1, :, 32:])}):
        assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[-1], emb[1, 0, 32:])
    assert _same(_snapshot(pipe), before)


def test_width_checks_per_encoder(tiny_sdxl, tiny_sd2_dir, tmp_path):
    from conceptexpress.models import load_pipeline

    with pytest.raises(InputError, match=r"width 80 but the pipeline's text encoders have widths 32 \+ 48"):
        load_tokens_into(tiny_sdxl, _sd_run(tmp_path / "sd", 80))
    bad = {"<a>": (torch.zeros(1, 32), torch.zeros(1, 40))}
    with pytest.raises(InputError, match=r"width 40 but the pipeline's text encoder 2 \(clip_g\) has width 48"), \
            run_tokens(tiny_sdxl, bad):
        pass
    make_sdxl_run(tmp_path / "xl")
    sd2 = load_pipeline(str(tiny_sd2_dir), device="cpu")
    with pytest.raises(InputError, match="vectors for 2 text encoders but the pipeline \\(SD 2.x\\) has 1"):
        load_tokens_into(sd2, tmp_path / "xl")
    assert "<c1>" not in tiny_sdxl.tokenizer.get_vocab() and "<c1>" not in sd2.tokenizer.get_vocab()


def _sd_run(run: Path, width: int) -> Path:
    entries = write_token_files(run, ["<c1>"], torch.randn(1, width))
    (run / "manifest.json").write_text(json.dumps({"format": "conceptexpress-run-1", "base_model": "x",
                                                   "complete": True, "tokens": entries}))
    return run


# ----------------------------------------------------------------------------- (3) the doc's diffusers snippet
def _doc_snippet() -> str:
    text = (ROOT / "docs" / "sdxl-tokens.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    block = next(b for b in blocks if "tokenizer_2" in b)
    # the tiny pipeline stands in for the hub model; the run's file for the example path
    return "\n".join(line for line in block.splitlines() if not line.startswith(("pipe = ", "import torch")))


def test_doc_snippet_loads_the_file_into_a_diffusers_sdxl_pipeline(tiny_sdxl, tmp_path):
    pipe = tiny_sdxl
    emb = make_sdxl_run(tmp_path / "run")
    code = _doc_snippet().replace("outputs/photo/concepts/c1.safetensors", str(tmp_path / "run/concepts/c1.safetensors"))
    assert code.count("load_textual_inversion(") == 2
    exec(compile(code, "docs/sdxl-tokens.md", "exec"), {"pipe": pipe})
    i1, i2 = pipe.tokenizer.convert_tokens_to_ids("<c1>"), pipe.tokenizer_2.convert_tokens_to_ids("<c1>")
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[i1], emb[0, 0, :32])
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[i2], emb[0, 0, 32:])
    # the snippet's pooling fix: diffusers' own encode_prompt now pools at the end of the text, as we do
    with torch.no_grad():
        theirs = pipe.encode_prompt("a photo of <c1>", device="cpu", do_classifier_free_guidance=False)
    ours = text_embeddings(pipe, "a photo of <c1>", guidance=1.0)
    assert torch.allclose(theirs[2], ours["pooled_prompt_embeds"], atol=1e-6)
    assert torch.allclose(theirs[0], ours["prompt_embeds"], atol=1e-6)


# ----------------------------------------------------------------------------- (4) generation
def _spy(pipe):
    seen = []
    original = type(pipe).__call__

    def call(self, *args, **kwargs):
        seen.append(kwargs)
        return original(self, *args, **kwargs)

    return seen, unittest.mock.patch.object(type(pipe), "__call__", call)


def test_generate_passes_the_end_of_text_pooled_embedding(tiny_sdxl, tmp_path):
    pipe = tiny_sdxl
    make_sdxl_run(tmp_path / "run")
    prompt = "a photo of <c2>"
    seen, patch = _spy(pipe)
    with run_tokens(pipe, tmp_path / "run"), patch:
        ids = pipe.tokenizer_2([prompt], padding="max_length", max_length=77, truncation=True,
                               return_tensors="pt").input_ids
        token_id = pipe.tokenizer_2.convert_tokens_to_ids("<c2>")
        assert token_id in ids[0] and int(ids.max()) == token_id  # the learned token holds the highest id
        images = generate(pipe, [prompt], GenerateConfig(n=1, steps=1, height=64, width=64, guidance=2.0))
        with torch.no_grad():
            out = pipe.text_encoder_2(ids, output_hidden_states=True)
            eot = int((ids[0] == pipe.tokenizer_2.eos_token_id).nonzero()[0])
            expected = pipe.text_encoder_2.text_projection(out.last_hidden_state[0, eot])
            diffusers_pooled = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[2]
            context = torch.cat([pipe.text_encoder(pipe.tokenizer([prompt], padding="max_length", max_length=77,
                                                                  return_tensors="pt").input_ids,
                                                   output_hidden_states=True).hidden_states[-2],
                                 out.hidden_states[-2]], dim=-1)
        negative = generate(pipe, [prompt], GenerateConfig(n=1, steps=1, height=64, width=64, guidance=2.0,
                                                           negative_prompt="blurry"))
    kwargs = seen[0]
    assert "prompt" not in kwargs and "negative_prompt" not in kwargs
    assert torch.allclose(kwargs["pooled_prompt_embeds"][0], expected, atol=1e-6)
    assert not torch.allclose(diffusers_pooled[0], expected, atol=1e-3)  # diffusers pools on the token
    assert torch.allclose(kwargs["prompt_embeds"], context, atol=1e-6)
    # empty negative prompt + force_zeros_for_empty_prompt: zeros, as diffusers does
    assert not kwargs["negative_prompt_embeds"].any() and not kwargs["negative_pooled_prompt_embeds"].any()
    neg = seen[1]
    blurry = text_embeddings(pipe, "blurry", guidance=1.0)
    assert torch.equal(neg["negative_prompt_embeds"], blurry["prompt_embeds"])
    assert torch.equal(neg["negative_pooled_prompt_embeds"], blurry["pooled_prompt_embeds"])
    assert images[0][0].size == (64, 64) and negative[0][0].size == (64, 64)


def test_generate_from_sdxl_run_hands_the_pipeline_back(tiny_sdxl, tmp_path):
    make_sdxl_run(tmp_path / "run")
    before = _snapshot(tiny_sdxl)
    root = generate_from_run(tmp_path / "run", ["<c1>"], GenerateConfig(n=1, steps=1, height=64, width=64),
                             pipe=tiny_sdxl, out_dir=tmp_path / "g")
    assert (root / "a-photo-of-c1" / "000.png").is_file()
    assert _same(_snapshot(tiny_sdxl), before)


def test_generate_on_sd2_is_the_pipelines_own_call(loaded_sd2):
    """SD 1.x / 2.x: the pipeline encodes the prompt itself, so images are bit-identical to a direct call."""
    pipe = loaded_sd2
    seen, patch = _spy(pipe)
    with patch:
        ours = generate(pipe, ["a photo of <c1>"], GenerateConfig(n=1, steps=2, height=64, width=64, scheduler="pipeline"))
    assert seen[0]["prompt"] == "a photo of <c1>" and "prompt_embeds" not in seen[0]
    direct = pipe(prompt="a photo of <c1>", negative_prompt=None, num_images_per_prompt=1,
                  generator=[torch.Generator("cpu").manual_seed(0)], num_inference_steps=2, guidance_scale=7.5,
                  height=64, width=64, output_type="pil").images[0]
    assert list(ours[0][0].convert("RGB").getdata()) == list(direct.convert("RGB").getdata())


@pytest.fixture
def loaded_sd2(tiny_sd2_dir, tmp_path):
    from conceptexpress.models import load_pipeline

    pipe = load_pipeline(str(tiny_sd2_dir), device="cpu")
    load_tokens_into(pipe, _sd_run(tmp_path / "sd2", 32))
    return pipe
