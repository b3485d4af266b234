"""Supervision: user masks (``--masks DIR``), initializer words (``--init-words``), and the supervised references of
paper Table 1 (grey rows) and Fig. 8: ``--method bas`` and ``--method bas-ft`` — on the tiny random pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conceptexpress.config import FineTuneConfig, GenerateConfig, RunConfig, SampleConfig, TrainConfig
from conceptexpress.errors import ConfigError, OutputError
from conceptexpress.io.masks import read_mask_folder

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "coffee.jpg"  # 600×400
W, H = 600, 400
NO_SAMPLES = SampleConfig(samples=False)


def _rects() -> list[np.ndarray]:
    a = np.zeros((H, W), bool)
    a[60:260, 40:300] = True
    b = np.zeros((H, W), bool)
    b[150:380, 340:580] = True
    return [a, b]


def _write_masks(folder: Path, masks, names=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for k, m in enumerate(masks):
        name = names[k] if names else f"mask{k}.png"
        Image.fromarray(m.astype(np.uint8) * 255, mode="L").save(folder / name)
    return folder


@pytest.fixture
def mask_dir(tmp_path):
    return _write_masks(tmp_path / "masks", _rects())


def _latent(masks, hw):
    t = torch.from_numpy(np.stack(masks)).float()[:, None]
    return torch.nn.functional.interpolate(t, size=hw, mode="area")[:, 0] > 0.5


# ---------------------------------------------------------------------------------------- the mask folder (no model)
def test_mask_folder_order_modes_and_digest(tmp_path):
    a, b = _rects()
    folder = tmp_path / "m"
    folder.mkdir()
    # Natural order: mask2 before mask10; an RGBA cut-out counts its opaque pixels; other files are ignored.
    Image.fromarray(a.astype(np.uint8) * 200, mode="L").save(folder / "mask10.png")
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[..., 3] = b * 255
    Image.fromarray(rgba, mode="RGBA").save(folder / "mask2.png")
    (folder / "notes.txt").write_text("not a mask")
    (folder / ".hidden.png").write_bytes(b"junk")
    got = read_mask_folder(folder, (W, H))
    assert got.files == ("mask2.png", "mask10.png")
    assert np.array_equal(got.masks[0], b) and np.array_equal(got.masks[1], a)
    # Same-aspect masks are resized to the photo; the digest follows the files' bytes.
    Image.fromarray(a.astype(np.uint8) * 255, mode="L").resize((300, 200), Image.Resampling.NEAREST).save(
        folder / "mask10.png"
    )
    again = read_mask_folder(folder, (W, H))
    assert again.masks.shape == (2, H, W) and again.sha256 != got.sha256
    assert np.array_equal(again.masks[1], a)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: None, "no such folder"),
        (lambda d: d.mkdir(), "holds no mask image"),
        (lambda d: _write_masks(d, [_rects()[0], np.zeros((H, W), bool)]), "is empty"),
        (lambda d: _write_masks(d, [_rects()[0], _rects()[0] | _rects()[1]]), "overlap on 52000 pixels"),
        (lambda d: _write_masks(d, [np.ones((100, 100), bool)]), "another aspect ratio"),
    ],
    ids=["missing", "no-images", "empty-mask", "overlap", "aspect"],
)
def test_bad_mask_folders_fail_before_the_model_loads(tmp_path, make, message, capsys):
    from conceptexpress.cli import main

    folder = tmp_path / "masks"
    make(folder)
    with pytest.raises(ConfigError, match=message):
        read_mask_folder(folder, (W, H))
    # Exit 2 with a model that does not exist: the masks were checked first (a model error would be exit 4).
    code = main(["-q", "extract", str(EXAMPLE), "--masks", str(folder), "--model", str(tmp_path / "no-model"),
                 "--out", str(tmp_path / "run")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err


def test_methods_check_their_supervision_before_the_model(tmp_path, mask_dir, capsys):
    from conceptexpress.cli import main

    base = ["-q", "extract", str(EXAMPLE), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "run")]
    cases = [
        (["--method", "bas"], "without either it is the BaS"),
        (["--method", "bas-dagger", "--masks", str(mask_dir)], "use --method bas"),
        (["--method", "bas-dagger", "--init-words", "a,b"], "use --method bas"),
        (["--method", "bas", "--masks", str(mask_dir), "--init-words", "a,b,c"], "names 3 words"),
        (["--masks", str(mask_dir), "--init-words", "a"], "names 1 words"),
        (["--init-words", "a,,b"], "no empty or multi-word"),
    ]
    for flags, message in cases:
        assert main([*base, *flags]) == 2, flags
        assert message in capsys.readouterr().err, flags


def test_cli_flags_parse():
    from conceptexpress.cli import build_parser, config_from_args

    args = build_parser().parse_args([
        "extract", "img.png", "--method", "bas-ft", "--masks", "m", "--init-words", "cup, saucer",
        "--finetune-steps", "3", "--finetune-lr", "1e-5", "--no-finetune-text-encoder",
    ])
    assert args.method == "bas-ft" and args.masks == Path("m")
    assert config_from_args(args, TrainConfig).init_word_list == ("cup", "saucer")
    assert config_from_args(args, FineTuneConfig) == FineTuneConfig(3, 1e-5, False)
    assert FineTuneConfig() == FineTuneConfig(400, 2e-6, True)  # Break-A-Scene's phase 2
    with pytest.raises(SystemExit):  # a dataset has no per-photo masks
        build_parser().parse_args(["extract-dataset", "photos", "--out", "runs", "--method", "bas"])


def test_supervised_runs_get_their_own_table_rows():
    from conceptexpress.evaluate.report import method_name, method_order
    from conceptexpress.evaluate.runs import method_label

    def manifest(method, masks=False, words=None, **train):
        return {"method": method, "user_masks": {"files": ["m.png"]} if masks else None,
                "config": {"TrainConfig": {"init_words": words, **train}}}

    labels = [
        method_label(manifest("conceptexpress")),
        method_label(manifest("conceptexpress", masks=True, words="a,b")),
        method_label(manifest("bas-dagger")),
        method_label(manifest("bas-ft", masks=True, words="a,b")),
        method_label(manifest("bas", masks=True, words="a,b")),
        method_label(manifest("bas", words="a,b")),
        method_label(manifest("conceptexpress", split_merge=False)),
    ]
    assert labels[1] == "conceptexpress +masks +words" and labels[3] == "bas-ft +masks +words"
    ordered = [method_name(m) for m in method_order(labels)]
    assert ordered == [
        "BaS +masks +words", "BaS +words", "BaS f.t. +masks +words", "BaS†", "ConceptExpress −SnM",
        "ConceptExpress +masks +words", "ConceptExpress",
    ]


# ---------------------------------------------------------------------------------------- initializer words
@pytest.mark.parametrize("split_merge", [True, False])
def test_init_words_initialize_every_row_of_their_concept(pipe, image, split_merge):
    from conceptexpress.baselines.bas import BaSTrainer
    from conceptexpress.learn.trainer import TokenTrainer

    masks = torch.zeros(2, 11, 16, dtype=torch.bool)
    masks[0, 1:5, 1:6] = True
    masks[1, 6:10, 8:15] = True
    cents = masks.flatten(1).float() / masks.flatten(1).sum(1, keepdim=True)
    table = pipe.text_encoder.get_input_embeddings().weight.detach()
    ids = [pipe.tokenizer(w, add_special_tokens=False).input_ids for w in ("a", "b")]
    assert all(len(i) == 1 for i in ids)
    cfg = TrainConfig(steps=1, init_words="a,b", split_merge=split_merge, checkpoint_every=0)
    for cls in (TokenTrainer, BaSTrainer):
        t = cls(pipe, image, (128, 88), masks, cents, cfg)
        v = t.vectors.detach()  # step 0: row j·N + i = word i
        assert v.shape[0] == 2 * t.g
        for row in range(v.shape[0]):
            assert torch.equal(v[row], table[ids[row % 2][0]].float()), (cls.__name__, row)
        random = cls(pipe, image, (128, 88), masks, cents, TrainConfig(steps=1, split_merge=split_merge))
        assert not torch.equal(random.vectors.detach()[0], v[0])
    with pytest.raises(ConfigError, match="names 3 words .* 2 concepts"):
        TokenTrainer(pipe, image, (128, 88), masks, cents, TrainConfig(init_words="a,b,c"))
    # The tiny tokenizer spells "cup" in three characters: refused, with its pieces shown.
    with pytest.raises(ConfigError, match="'cup' is 3 tokens"):
        BaSTrainer(pipe, image, (128, 88), masks, cents, TrainConfig(init_words="cup,b"))


def test_init_words_count_is_checked_after_automatic_localization(tiny_sd2_dir, tmp_path, monkeypatch):
    from conceptexpress import extract as extract_mod
    from conceptexpress.learn.trainer import TokenTrainer

    def no_training(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(TokenTrainer, "train", no_training)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="but there are \\d+ concepts"):
        train = TrainConfig(steps=1, split_merge=False, init_words=",".join("abcdefghijklmnopqrst"))
        extract_mod.extract(EXAMPLE, out, RunConfig(model=_model(tiny_sd2_dir), sample=NO_SAMPLES, train=train))
    assert (out / "localization.json").is_file()


# ---------------------------------------------------------------------------------------- extract --masks
def _model(path):
    from conceptexpress.config import ModelConfig

    return ModelConfig(model=str(path), device="cpu")


def test_extract_with_masks_skips_clustering_and_reuses_only_the_same_masks(tiny_sd2_dir, tmp_path, mask_dir, monkeypatch):
    from conceptexpress.attention.localizer import ConceptLocalizer
    from conceptexpress.extract import extract

    def no_clustering(self, image):
        raise AssertionError("clustering ran")

    monkeypatch.setattr(ConceptLocalizer, "__call__", no_clustering)
    out = tmp_path / "run"
    cfg = TrainConfig(steps=2, merge_step=1, checkpoint_every=0)
    m = extract(EXAMPLE, out, RunConfig(model=_model(tiny_sd2_dir), train=cfg, sample=NO_SAMPLES, masks=mask_dir))
    assert m["num_concepts"] == 2 and m["method"] == "conceptexpress"
    loc = json.loads((out / "localization.json").read_text())
    assert loc["source"] == "user masks" and loc["mask_files"] == ["mask0.png", "mask1.png"]
    assert loc["masks_sha256"] == read_mask_folder(mask_dir, (W, H)).sha256
    from safetensors.torch import load_file

    t = load_file(str(out / "localization.safetensors"))
    latent = _latent(_rects(), tuple(loc["latent_size"]))
    assert torch.equal(t["masks"].bool(), latent)  # the tokens' masks are the given masks, in file order
    for k, rect in enumerate(_rects()):
        assert np.array_equal(np.asarray(Image.open(out / loc["masks"][k])) > 0, rect)
    # Centroids are Eq. 6 rows of the image's attention: distributions over the latent.
    assert torch.allclose(t["centroids"].sum(1), torch.ones(2), atol=1e-4)

    calls = []
    real = ConceptLocalizer.from_masks
    monkeypatch.setattr(ConceptLocalizer, "from_masks", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    extract(EXAMPLE, out, RunConfig(model=_model(tiny_sd2_dir), train=cfg, sample=NO_SAMPLES, masks=mask_dir))
    assert calls == []  # same masks: localization reused
    _write_masks(mask_dir, [_rects()[1], _rects()[0]])  # same files, swapped contents
    # Other masks are other options (issue 11): refused unless the old run is overwritten.
    with pytest.raises(OutputError, match="other masks"):
        extract(EXAMPLE, out, RunConfig(model=_model(tiny_sd2_dir), train=cfg, sample=NO_SAMPLES, masks=mask_dir))
    assert calls == []
    extract(EXAMPLE, out, RunConfig(model=_model(tiny_sd2_dir), train=cfg, sample=NO_SAMPLES, masks=mask_dir, overwrite=True))
    assert calls == [1]
    t = load_file(str(out / "localization.safetensors"))
    assert torch.equal(t["masks"].bool(), latent.flip(0))


# ---------------------------------------------------------------------------------------- bas and bas-ft
def test_bas_run_completes_with_words_and_masks(tiny_sd2_dir, tmp_path, mask_dir):
    from conceptexpress.cli import main

    out = tmp_path / "run"
    code = main(["-q", "extract", str(EXAMPLE), "--method", "bas", "--masks", str(mask_dir), "--init-words", "a,b",
                 "--model", str(tiny_sd2_dir), "--device", "cpu", "--out", str(out), "--steps", "2", "--no-samples"])
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["method"] == "bas" and m["complete"] and m["num_concepts"] == 2 and m["steps"] == 2
    assert m["config"]["TrainConfig"]["init_words"] == "a,b" and m["fine_tune"] is None
    assert m["user_masks"]["files"] == ["mask0.png", "mask1.png"]
    assert m["sample_passes"] == 2 and not (out / "pipeline").exists()
    history = json.loads((out / "history.json").read_text())
    assert [r["phase"] for r in history] == ["union", "union"]


def test_bas_ft_writes_a_pipeline_that_generate_uses(tiny_sd2_dir, tmp_path, mask_dir, pipe, monkeypatch):
    from safetensors.torch import load_file

    from conceptexpress import generate as generate_mod
    from conceptexpress.extract import extract
    from conceptexpress.io.run_folder import read_manifest

    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    te_before = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    vocab = len(pipe.tokenizer)
    out = tmp_path / "run"
    m = extract(EXAMPLE, out, RunConfig(model=_model(tiny_sd2_dir), method="bas-ft", masks=mask_dir, train=TrainConfig(steps=2, init_words="a,b", checkpoint_every=0), finetune=FineTuneConfig(finetune_steps=2, finetune_lr=1e-3), sample=SampleConfig(sample_count=1, sample_steps=2)), pipe=pipe)
    assert m["base_model"] == "pipeline" and m["single_file_config"] is None
    ft = m["fine_tune"]
    assert ft["base_model"] == str(Path(tiny_sd2_dir).resolve()) and ft["steps"] == 2 and ft["text_encoder"]
    assert m["config"]["FineTuneConfig"] == {"finetune_steps": 2, "finetune_lr": 1e-3, "finetune_text_encoder": True}
    assert m["sample_passes"] == 4 and m["samples"]
    history = json.loads((out / "history.json").read_text())
    assert [r["phase"] for r in history] == ["union", "union", "finetune", "finetune"]
    assert [r["step"] for r in history] == [1, 2, 3, 4]
    # The saved UNet and text encoder differ from the base model's; the caller's pipeline is unchanged.
    unet_files = sorted((out / "pipeline" / "unet").glob("*.safetensors"))
    assert unet_files and not list((out / "pipeline").rglob("*.bin"))
    saved = {k: v for f in unet_files for k, v in load_file(str(f)).items()}
    assert any(not torch.equal(saved[k].float(), before[k].float()) for k in before)
    te_saved = {k: v for f in (out / "pipeline" / "text_encoder").glob("*.safetensors") for k, v in load_file(str(f)).items()}
    assert any(not torch.equal(te_saved[k].float(), te_before[k].float()) for k in te_before if k in te_saved)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())
    assert all(torch.equal(v, te_before[k]) for k, v in pipe.text_encoder.state_dict().items())
    assert len(pipe.tokenizer) == vocab

    # generate RUN loads RUN/pipeline (the manifest's relative base model, resolved against the run folder).
    manifest = read_manifest(out)
    assert generate_mod.run_model_config(manifest, None, out).model == str((out / "pipeline").resolve())
    with pytest.raises(ConfigError, match="pass `run_dir`"):
        generate_mod.run_model_config(manifest)
    loaded = []
    real = generate_mod.load_pipeline

    def spy(cfg):
        loaded.append(cfg.model)
        return real(cfg)

    monkeypatch.setattr(generate_mod, "load_pipeline", spy)
    root = generate_mod.generate_from_run(out, ["<c1>"], GenerateConfig(n=1, steps=2), model_options={"device": "cpu"})
    assert loaded == [str((out / "pipeline").resolve())]
    assert list(root.rglob("*.png"))
