"""Model families: detection of the tiny SD 1.x / 2.x / SDXL pipelines loaded through the user's path (folder,
single file, hub id), detection from configs before loading, and SDXL's text conditioning (`ModelFamily.encode`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conceptexpress.models import load_pipeline
from conceptexpress.models.family import (
    SD1,
    SD2,
    SDXL,
    SUPPORTED,
    UnsupportedModelError,
    family_from_configs,
    family_of,
)


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_pipeline(tiny_sdxl_dir, device="cpu")


# --- detection through load_pipeline ----------------------------------------------------------------------


def test_folders_load_as_their_family(tiny_sd1_dir, tiny_sd2_dir, sdxl):
    assert family_of(load_pipeline(tiny_sd1_dir, device="cpu")) is SD1
    assert family_of(load_pipeline(tiny_sd2_dir, device="cpu")) is SD2
    # An SDXL folder is an SDXL pipeline with both encoders and tokenizers (it used to load as SD, dropping one).
    assert type(sdxl).__name__ == "StableDiffusionXLPipeline" and family_of(sdxl) is SDXL
    assert [e.config.hidden_size for e in SDXL.text_encoders(sdxl)] == [32, 48]
    assert sdxl.tokenizer.pad_token == "<|endoftext|>" and sdxl.tokenizer_2.pad_token == "!"
    assert sdxl.text_encoder_2.config.eos_token_id == 2  # the legacy value of the real SDXL config
    assert type(sdxl.scheduler).__name__ == "EulerDiscreteScheduler"
    assert sdxl.vae.config.force_upcast and sdxl.vae.config.scaling_factor == 0.13025
    for encoder in SDXL.text_encoders(sdxl):  # frozen_pipeline froze both encoders
        assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert SDXL.native_resolution(sdxl) == 128 and SDXL.self_attention_divisor(sdxl) == 2


def test_sdxl_single_file_loads_the_folder_weights(tiny_sdxl_dir, sdxl, tmp_path):
    from conceptexpress.models.single_file import inspect_single_file
    from conceptexpress.testing import save_tiny_sdxl_single_file

    path = save_tiny_sdxl_single_file(tiny_sdxl_dir, tmp_path / "sdxl.safetensors")
    info = inspect_single_file(path)
    assert (info.family, info.text_encoder, info.cross_attention_dim) == ("sdxl", "clip+open_clip", 80)
    pipe = load_pipeline(str(path), device="cpu", single_file_config=str(tiny_sdxl_dir))
    assert family_of(pipe) is SDXL
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        ours, ref = getattr(pipe, name).state_dict(), getattr(sdxl, name).state_dict()
        assert ours.keys() == ref.keys(), name
        assert all(torch.equal(ours[k], ref[k]) for k in ref), name


def test_sdxl_single_file_default_config_is_the_sdxl_base_configs(tiny_sdxl_dir, tmp_path, monkeypatch):
    """No config source given: the SDXL base hub id, resolved to configs only (the cache is stubbed here)."""
    import huggingface_hub

    from conceptexpress.models.single_file import SDXL_CONFIG
    from conceptexpress.testing import save_tiny_sdxl_single_file

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("local_files_only"), kwargs.get("allow_patterns")))
        return str(tiny_sdxl_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_tiny_sdxl_single_file(tiny_sdxl_dir, tmp_path / "sdxl.safetensors")
    assert family_of(load_pipeline(str(path), device="cpu")) is SDXL
    assert SDXL_CONFIG == "stabilityai/stable-diffusion-xl-base-1.0"
    assert [(c[0], c[1]) for c in calls] == [(SDXL_CONFIG, True)]
    assert all(p.endswith((".json", ".txt", ".model")) for p in calls[0][2])  # configs only, never weights


def _hub_cache(folder, tmp_path, monkeypatch, repo="tiny-org/tiny-sdxl"):
    import huggingface_hub.constants as hub_constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    root = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    return repo


def test_sdxl_hub_id_loads_from_the_cache(tiny_sdxl_dir, tmp_path, monkeypatch):
    repo = _hub_cache(tiny_sdxl_dir, tmp_path, monkeypatch)
    pipe = load_pipeline(repo, device="cpu")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline" and family_of(pipe) is SDXL


def test_sd1_hub_id_loads_from_the_cache(tiny_sd1_dir, tmp_path, monkeypatch):
    assert family_of(load_pipeline(_hub_cache(tiny_sd1_dir, tmp_path, monkeypatch, "org/sd1"), device="cpu")) is SD1


# --- detection from configs (before any weight) -------------------------------------------------------------


def _configs(folder):
    read = lambda name: json.loads((folder / name).read_text())  # noqa: E731
    return read("model_index.json"), read("unet/config.json")


def test_family_from_configs_agrees_with_family_of(tiny_sd1_dir, tiny_sd2_dir, tiny_sdxl_dir):
    for folder, family in ((tiny_sd1_dir, SD1), (tiny_sd2_dir, SD2), (tiny_sdxl_dir, SDXL)):
        index, unet = _configs(folder)
        te = json.loads((folder / "text_encoder" / "config.json").read_text())
        tok = json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())
        assert family_from_configs(index, unet, te, tok) is family


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"text_encoder": [None, None], "tokenizer": [None, None], "_class_name": "StableDiffusionXLImg2ImgPipeline"},
         "SDXL refiner"),
        ({"_class_name": "StableDiffusionXLInpaintPipeline"}, "inpainting"),
        ({"unet": [None, None], "transformer": ["diffusers", "PixArtTransformer2DModel"],
          "_class_name": "PixArtSigmaPipeline"}, "no UNet"),
    ],
)
def test_unsupported_pipelines_from_configs(tiny_sdxl_dir, change, reason):
    index, unet = _configs(tiny_sdxl_dir)
    with pytest.raises(UnsupportedModelError, match=reason) as err:
        family_from_configs({**index, **change}, unet)
    assert str(err.value).endswith(SUPPORTED) and "\n" not in str(err.value)


def test_inpainting_unet_from_configs(tiny_sd2_dir):
    index, unet = _configs(tiny_sd2_dir)
    with pytest.raises(UnsupportedModelError, match="9 input channels.*inpainting"):
        family_from_configs(index, {**unet, "in_channels": 9})


def test_sdxl_refiner_single_file_is_refused_from_the_header():
    from conceptexpress.models.single_file import UnsupportedCheckpointError, classify_checkpoint

    shapes = {"model.diffusion_model.input_blocks.0.0.weight": (384, 4, 3, 3),
              "conditioner.embedders.0.model.text_projection": (1280, 1280),
              "first_stage_model.encoder.conv_in.weight": (128, 3, 3, 3)}  # fmt: skip
    with pytest.raises(UnsupportedCheckpointError, match="SDXL refiner"):
        classify_checkpoint(shapes)


# --- SDXL text conditioning ---------------------------------------------------------------------------------


def test_sdxl_encode_context_and_pooled_by_hand(sdxl):
    ids = SDXL.tokenize(sdxl, ["a cat", ""])
    time_ids = SDXL.micro_conditioning((400, 600), (128, 128))
    with torch.no_grad():
        cond = SDXL.encode(sdxl, ids, time_ids=time_ids)
        assert cond.context.shape == (2, 77, 32 + 48)  # context width = sum of the encoders' widths
        assert cond.time_ids.shape == (2, 6) and cond.time_ids[0].tolist() == [400, 600, 0, 0, 128, 128]
        out = sdxl.text_encoder_2(ids[1], output_hidden_states=True)
        eot = (ids[1] == sdxl.tokenizer_2.eos_token_id).int().argmax(1)
        by_hand = sdxl.text_encoder_2.text_projection(out.last_hidden_state[torch.arange(2), eot])
        assert cond.pooled.shape == (2, 40)
        torch.testing.assert_close(cond.pooled, by_hand)
        h1 = sdxl.text_encoder(ids[0], output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(cond.context, torch.cat([h1, out.hidden_states[-2]], -1))
        # Same as diffusers' own SDXL prompt encoding (no added token: argmax still finds the end-of-text id)
        ref, _, pooled, _ = sdxl.encode_prompt("a cat", do_classifier_free_guidance=False)
        torch.testing.assert_close(cond.context[:1], ref)
        torch.testing.assert_close(cond.pooled[:1], pooled)


def test_pooled_is_taken_at_end_of_text_not_at_the_added_token(sdxl):
    """Encoder 2's config says eos_token_id=2 (legacy): transformers pools at argmax(input_ids), which is an added
    token's position once one exists (its id is the highest); the family pools at the end-of-text position."""
    new_id = len(sdxl.tokenizer_2)  # the id the next added token would get: the highest
    ids = SDXL.tokenize(sdxl, ["a cat"])
    ids = [i.clone() for i in ids]
    ids[0][0, 2] = sdxl.tokenizer.eos_token_id - 1  # keep encoder 1 inside its vocabulary
    ids[1][0, 2] = new_id
    enc2 = sdxl.text_encoder_2
    enc2.resize_token_embeddings(new_id + 1)
    try:
        with torch.no_grad():
            cond = SDXL.encode(sdxl, ids, time_ids=SDXL.micro_conditioning((128, 128), (128, 128)))
            out = enc2(ids[1], output_hidden_states=True)
            eot = int((ids[1][0] == sdxl.tokenizer_2.eos_token_id).int().argmax())
            assert eot != 2
            by_hand = enc2.text_projection(out.last_hidden_state[0, eot])
            torch.testing.assert_close(cond.pooled[0], by_hand)
            assert not torch.allclose(cond.pooled[0], out.text_embeds[0])  # transformers' argmax pooling
    finally:
        enc2.resize_token_embeddings(new_id)


def test_sdxl_fp16_keeps_the_vae_in_fp32(tiny_sdxl_dir, tiny_sd2_dir):
    pipe = load_pipeline(tiny_sdxl_dir, device="cpu", dtype="fp16")
    assert pipe.unet.dtype == pipe.text_encoder_2.dtype == torch.float16
    assert pipe.vae.dtype == torch.float32
    latents = torch.randn(1, 4, 4, 4, dtype=torch.float16)  # fp16 latents, as diffusers' SDXL pipeline decodes
    with torch.no_grad():
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
        mean = pipe.vae.encode(torch.rand(1, 3, 32, 32, dtype=torch.float16)).latent_dist.mean
    assert image.dtype == mean.dtype == torch.float32 and torch.isfinite(image).all()
    # bf16 has fp32's range: no upcast; SD 2.x VAEs are left as they are.
    assert load_pipeline(tiny_sdxl_dir, device="cpu", dtype="bf16").vae.dtype == torch.bfloat16
    assert load_pipeline(tiny_sd2_dir, device="cpu", dtype="fp16").vae.dtype == torch.float16
