"""Single-file .safetensors checkpoints: LDM layout export, family detection, loading, and its errors."""

from __future__ import annotations

import functools

import pytest
import torch

from conceptexpress.errors import ModelLoadError
from conceptexpress.models.single_file import (
    ALTERNATIVES,
    SD1_CONFIG,
    SD2_CONFIG,
    classify_checkpoint,
    inspect_single_file,
    load_single_file,
    v_pred_probe_key,
)
from conceptexpress.testing import ldm_format, save_tiny_single_file


@pytest.fixture(scope="module", params=["clip", "open_clip"])
def tiny_file(request, tiny_sd2_dir, tmp_path_factory):
    """The tiny pipeline as one LDM-layout file, text encoder in SD 1.x (clip) or SD 2.x (open_clip) names."""
    out = tmp_path_factory.mktemp("single") / f"tiny-{request.param}.safetensors"
    return request.param, save_tiny_single_file(tiny_sd2_dir, out, text_encoder_layout=request.param)


@pytest.fixture(scope="module")
def folder_pipe(tiny_sd2_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd2_dir)


def _shapes(prefix: str, state_dict) -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in state_dict.items()}


@functools.cache
def _full_size_ldm_shapes(text_encoder_layout: str, cross_attention_dim: int, width: int):
    """Key → shape of a full-size SD checkpoint, built on the meta device (no memory, no weights).

    Cached: callers must copy the returned dict before changing it.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from conceptexpress.testing import sd21_unet_config

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**sd21_unet_config(), "cross_attention_dim": cross_attention_dim})
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
        )
        te = CLIPTextModel(
            CLIPTextConfig(hidden_size=width, intermediate_size=4 * width, num_hidden_layers=2)
        )
    sd = ldm_format.pipeline_to_ldm(
        unet.state_dict(), vae.state_dict(), te.state_dict(), text_encoder_layout=text_encoder_layout
    )
    return {k: tuple(v.shape) for k, v in sd.items()}, unet, vae


# --- LDM layout ------------------------------------------------------------------------------------------


def test_full_size_layout_round_trips_through_diffusers_converters():
    """Our diffusers→LDM names, fed to diffusers' own LDM→diffusers converters, give back every tensor."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    shapes, unet, vae = _full_size_ldm_shapes("open_clip", 1024, 64)
    # Names the official SD checkpoints are known by (diffusers' own family probes among them).
    for key in (
        "model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.middle_block.1.proj_in.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight",
    ):
        assert key in shapes, key
    assert shapes["first_stage_model.encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)

    ldm = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    back_unet = convert_ldm_unet_checkpoint(ldm, dict(unet.config))
    assert {k: tuple(v.shape) for k, v in back_unet.items()} == {
        k: tuple(v.shape) for k, v in unet.state_dict().items()
    }
    vae_ldm = {
        k.removeprefix("first_stage_model."): v for k, v in ldm.items() if k.startswith("first_stage_model.")
    }
    back_vae = convert_ldm_vae_checkpoint(vae_ldm, dict(vae.config))
    assert {k: tuple(v.shape) for k, v in back_vae.items()} == {
        k: tuple(v.shape) for k, v in vae.state_dict().items()
    }


def test_unknown_component_key_is_refused():
    with pytest.raises(ValueError, match="no LDM equivalent"):
        ldm_format.unet_to_ldm(
            {"down_blocks.0.resnets.0.conv1.weight": torch.zeros(1), "add_embedding.x": torch.zeros(1)}
        )


# --- family detection ------------------------------------------------------------------------------------


def test_detects_full_size_sd2_and_sd1_from_shapes():
    sd2, _, _ = _full_size_ldm_shapes("open_clip", 1024, 64)
    info = classify_checkpoint(sd2)
    assert (info.family, info.text_encoder, info.cross_attention_dim, info.in_channels) == (
        "sd2",
        "open_clip",
        1024,
        4,
    )
    sd1, _, _ = _full_size_ldm_shapes("clip", 768, 64)
    info = classify_checkpoint(sd1)
    assert (info.family, info.text_encoder, info.cross_attention_dim) == ("sd1", "clip", 768)
    assert info.prediction_type is None


def test_detects_v_prediction_from_metadata_marker_and_weights():
    sd2, _, _ = _full_size_ldm_shapes("open_clip", 1024, 64)
    declared = classify_checkpoint(sd2, metadata={"modelspec.prediction_type": "v"})
    assert (declared.prediction_type, declared.prediction_is_explicit) == ("v_prediction", True)
    marker = classify_checkpoint({**sd2, "v_pred": ()})
    assert marker.prediction_type == "v_prediction"
    probe = v_pred_probe_key(list(sd2))
    assert probe == "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
    spread = classify_checkpoint(sd2, v_pred_probe=torch.linspace(-0.5, 0.5, 320))
    flat = classify_checkpoint(sd2, v_pred_probe=torch.full((320,), 0.01))
    assert (spread.prediction_type, spread.prediction_is_explicit) == ("v_prediction", False)
    assert flat.prediction_type == "epsilon"


@pytest.mark.parametrize(
    "keys, reason",
    [
        ({"conditioner.embedders.0.transformer.text_model.x": (1,), "model.x": (1,)}, "SDXL"),
        ({"down_blocks.0.resnets.0.conv1.weight": (1,)}, "diffusers layout"),
        ({"lora_unet_down_blocks_0.alpha": ()}, "LoRA"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, "text-encoder"),
    ],
)
def test_unknown_layouts_name_the_reason(keys, reason):
    with pytest.raises(ValueError, match=reason):
        classify_checkpoint(keys)


def test_inpainting_unet_is_refused():
    sd1 = dict(_full_size_ldm_shapes("clip", 768, 64)[0])
    sd1["model.diffusion_model.input_blocks.0.0.weight"] = (320, 9, 3, 3)
    with pytest.raises(ValueError, match="inpainting"):
        classify_checkpoint(sd1)


def test_inspect_tiny_file(tiny_file):
    layout, path = tiny_file
    info = inspect_single_file(path)
    # Width 32 is neither 768 nor 1024: the text-encoder layout decides.
    assert info.family == {"clip": "sd1", "open_clip": "sd2"}[layout]
    assert (info.text_encoder, info.cross_attention_dim) == (layout, 32)


# --- loading ---------------------------------------------------------------------------------------------


def test_single_file_loads_the_same_weights_as_the_folder(tiny_file, tiny_sd2_dir, folder_pipe):
    _, path = tiny_file
    pipe = load_single_file(path, torch_dtype=torch.float32, config=str(tiny_sd2_dir))
    assert pipe.safety_checker is None
    for name in ("unet", "vae", "text_encoder"):
        ours, ref = getattr(pipe, name).state_dict(), getattr(folder_pipe, name).state_dict()
        assert ours.keys() == ref.keys(), name
        for key in ref:
            assert torch.equal(ours[key], ref[key]), f"{name}.{key}"
    assert pipe.scheduler.config.prediction_type == folder_pipe.scheduler.config.prediction_type
    assert pipe.tokenizer("a cat").input_ids == folder_pipe.tokenizer("a cat").input_ids

    # And the loaded models compute the same thing (bitwise-equal weights; kernels may differ in the last
    # bit with tensor strides, hence float32 tolerances).
    ids = folder_pipe.tokenizer("a cat", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        emb = pipe.text_encoder(ids)[0]
        torch.testing.assert_close(emb, folder_pipe.text_encoder(ids)[0])
        latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        out = pipe.unet(latents, 10, encoder_hidden_states=emb).sample
        torch.testing.assert_close(out, folder_pipe.unet(latents, 10, encoder_hidden_states=emb).sample)
        image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        torch.testing.assert_close(
            pipe.vae.encode(image).latent_dist.mean, folder_pipe.vae.encode(image).latent_dist.mean
        )


def test_explicit_v_prediction_marker_switches_the_scheduler(tiny_sd2_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    src = save_tiny_single_file(tiny_sd2_dir, tmp_path / "eps.safetensors")
    marked = tmp_path / "v.safetensors"
    save_file(load_file(src), str(marked), metadata={"modelspec.prediction_type": "v"})
    pipe = load_single_file(marked, torch_dtype=torch.float32, config=str(tiny_sd2_dir))
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_fp16_load(tiny_file, tiny_sd2_dir):
    _, path = tiny_file
    pipe = load_single_file(path, torch_dtype=torch.float16, config=str(tiny_sd2_dir))
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float16


# --- errors ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.ckpt", "model.pt", "model.bin"])
def test_pickles_are_refused_without_being_opened(tmp_path, monkeypatch, name):
    path = tmp_path / name
    path.write_bytes(b"\x80\x04 not even a real pickle")
    opened = []
    real_open = open

    def spy(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", spy)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called on a pickle"))
    with pytest.raises(ModelLoadError, match=r"pickle.*convert it to \.safetensors") as err:
        load_single_file(path, torch_dtype=torch.float32)
    assert str(path) not in opened
    assert "\n" not in str(err.value) and name in str(err.value)


def test_garbage_bytes_are_refused(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(ModelLoadError, match="not a valid safetensors file") as err:
        load_single_file(path, torch_dtype=torch.float32)
    assert "garbage.safetensors" in str(err.value) and ALTERNATIVES in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_layout_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "unet_only_diffusers.safetensors"
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ModelLoadError, match="diffusers layout"):
        load_single_file(path, torch_dtype=torch.float32)


def test_missing_file_and_wrong_suffix(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_single_file(tmp_path / "nope.safetensors", torch_dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="not a .safetensors file"):
        load_single_file(tmp_path / "model.onnx", torch_dtype=torch.float32)


def test_missing_default_config_offline_names_config_and_alternatives(tiny_file, monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A cache that certainly lacks the configs (snapshot_download reads this constant at call time).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    layout, path = tiny_file
    expected = {"clip": SD1_CONFIG, "open_clip": SD2_CONFIG}[layout]
    with pytest.raises(ModelLoadError) as err:
        load_single_file(path, torch_dtype=torch.float32)
    message = str(err.value)
    assert expected in message and path.name in message and ALTERNATIVES in message
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_bad_explicit_config_sources(tiny_file, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, path = tiny_file
    (tmp_path / "not-a-pipeline").mkdir()
    with pytest.raises(ModelLoadError, match="without model_index.json"):
        load_single_file(path, torch_dtype=torch.float32, config=str(tmp_path / "not-a-pipeline"))
    with pytest.raises(ModelLoadError, match="neither an existing folder nor a hub id"):
        load_single_file(path, torch_dtype=torch.float32, config=str(tmp_path / "missing" / "dir"))


def test_mismatched_config_is_a_model_load_error(tmp_path, tiny_sd2_dir):
    """A config whose shapes do not fit the file (tiny file, other widths) fails with the one-line error."""
    import json
    import shutil

    path = save_tiny_single_file(tiny_sd2_dir, tmp_path / "tiny.safetensors")
    other = tmp_path / "other-config"
    shutil.copytree(tiny_sd2_dir, other)
    cfg_file = other / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["block_out_channels"] = [64, 64, 128, 128]
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError) as err:
        load_single_file(path, torch_dtype=torch.float32, config=str(other))
    assert str(other) in str(err.value) and "\n" not in str(err.value)


def test_git_lfs_pointer_is_named(tmp_path):
    path = tmp_path / "v2-1_512-ema-pruned.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 5214604584\n")
    with pytest.raises(ModelLoadError, match="git-lfs pointer"):
        load_single_file(path, torch_dtype=torch.float32)


def test_partial_hub_cache_counts_as_missing(tiny_file, monkeypatch, tmp_path):
    """A cached snapshot without the pipeline configs must not be used as if it were complete."""
    import huggingface_hub

    partial = tmp_path / "snapshot"
    (partial / "unet").mkdir(parents=True)
    (partial / "model_index.json").write_text("{}")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(partial))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, path = tiny_file
    with pytest.raises(ModelLoadError, match=r"org/tiny.*lacks unet/config\.json.*HF_HUB_OFFLINE"):
        load_single_file(path, torch_dtype=torch.float32, config="org/tiny")


@pytest.mark.parametrize("declared", [None, "metadata", "weights"])
def test_default_config_follows_the_family_from_the_cache(tiny_sd2_dir, tmp_path, monkeypatch, declared):
    """No ``config``: the family picks the hub id, read from the local cache first (stubbed here)."""
    import huggingface_hub
    from safetensors.torch import load_file, save_file

    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("local_files_only")))
        return str(tiny_sd2_dir)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = save_tiny_single_file(tiny_sd2_dir, tmp_path / "sd2.safetensors", text_encoder_layout="open_clip")
    if declared == "metadata":
        save_file(load_file(path), str(path), metadata={"modelspec.prediction_type": "v"})
    elif declared == "weights":  # the spread of LayerNorm biases that v-prediction training leaves
        tensors = load_file(path)
        tensors[v_pred_probe_key(list(tensors))] = torch.linspace(-0.5, 0.5, 32)
        save_file(tensors, str(path))
    pipe = load_single_file(path, torch_dtype=torch.float32)
    assert calls == [(SD2_CONFIG, True)]
    if declared:  # SD 2.x v-prediction: the 768 px models, same architecture as the base mirror
        assert pipe.scheduler.config.prediction_type == "v_prediction"
        assert pipe.unet.config.sample_size == 96
    else:
        assert pipe.scheduler.config.prediction_type == "epsilon"
        assert pipe.unet.config.sample_size == 16


def test_weight_heuristic_never_overrides_an_explicit_config(tiny_sd2_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_tiny_single_file(tiny_sd2_dir, tmp_path / "sd2.safetensors", text_encoder_layout="open_clip")
    tensors = load_file(path)
    tensors[v_pred_probe_key(list(tensors))] = torch.linspace(-0.5, 0.5, 32)
    save_file(tensors, str(path))
    assert inspect_single_file(path).prediction_type == "v_prediction"
    pipe = load_single_file(path, torch_dtype=torch.float32, config=str(tiny_sd2_dir))
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.unet.config.sample_size == 16
