"""The BaS† baseline (paper §4.1) on the tiny random pipeline: union sampling, union mask, attention loss, resume."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from conceptexpress.baselines.bas import LAMBDA_ATTENTION, BaSTrainer, attention_mse, sample_union
from conceptexpress.config import TrainConfig
from conceptexpress.learn import losses
from conceptexpress.learn.trainer import TokenTrainer

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "coffee.jpg"
WORK = (128, 88)  # the tiny model's working size for the 600×400 example
LATENT = (11, 16)


def _concepts(n: int = 3):
    """Up to three rectangles on the 11×16 latent and centroids peaked on them (row-stochastic)."""
    masks = torch.zeros(3, *LATENT, dtype=torch.bool)
    masks[0, 2:6, 2:7] = True
    masks[1, 5:10, 9:14] = True
    masks[2, 0:3, 11:16] = True
    cents = masks.flatten(1).float() + 0.05
    return masks[:n], cents[:n] / cents[:n].sum(1, keepdim=True)


def _trainer(pipe, image, n: int = 3, **kw) -> BaSTrainer:
    masks, cents = _concepts(n)
    cfg = TrainConfig(**{"steps": 4, "micro_batch": 4, "checkpoint_every": 0, **kw})
    return BaSTrainer(pipe, image, WORK, masks, cents, cfg)


# ---------------------------------------------------------------------------------------- union sampling (pure)


def test_sample_union_is_breakascenes_distribution():
    gen = torch.Generator().manual_seed(0)
    draws = [sample_union(4, gen) for _ in range(400)]
    for d in draws:
        assert 1 <= len(d) <= 4 and len(set(d)) == len(d) and all(0 <= c < 4 for c in d)
    sizes = Counter(len(d) for d in draws)
    assert set(sizes) == {1, 2, 3, 4} and min(sizes.values()) > 60  # k ~ U{1..N}: ~100 each
    assert set().union(*map(set, draws)) == {0, 1, 2, 3}  # every concept is trained
    assert len({tuple(d) for d in draws}) > 20  # subsets and their order vary
    assert any(d != sorted(d) for d in draws)  # token order as sampled, not sorted
    again = torch.Generator().manual_seed(0)
    assert [sample_union(4, again) for _ in range(400)] == draws  # deterministic per seed
    other = torch.Generator().manual_seed(1)
    assert [sample_union(4, other) for _ in range(400)] != draws
    assert sample_union(1, gen) == [0]
    with pytest.raises(ValueError, match="num_concepts"):
        sample_union(0, gen)


# ---------------------------------------------------------------------------------------- attention loss (pure)


def test_attention_loss_matches_hand_computation(pipe, image):
    tr = _trainer(pipe, image)
    masks, _ = _concepts()
    gen = torch.Generator().manual_seed(3)
    maps = torch.rand(2, 2, 3, 4, generator=gen, dtype=torch.float64) + 0.01  # (b, width, h4, w4)
    prompts = [tr.union_prompt([2, 0]), tr.union_prompt([1])]  # the second is ragged: maps[1, 1] is padding
    got = tr.attention_loss(maps, prompts, masks, torch.empty(0))

    # Nearest downsampling 11×16 -> 3×4 picks rows floor(i·11/3) and columns floor(j·16/4).
    rows, cols = [0, 3, 7], [0, 4, 8, 12]
    small = masks[:, rows][:, :, cols].double()  # (3, 3, 4)

    def mse(a, m):
        return ((m - a / a.max()) ** 2).mean()

    expected = torch.stack([mse(maps[0, 0], small[2]) + mse(maps[0, 1], small[0]), mse(maps[1, 0], small[1])])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert tr.attention_weight == LAMBDA_ATTENTION == 1e-2


def test_attention_mse_reaches_zero_on_the_mask_and_has_gradient():
    mask = torch.zeros(1, 4, 4)
    mask[0, 1:3, 1:3] = 1
    assert attention_mse(mask * 0.3, mask).item() == 0.0  # scale-free: the map is divided by its max
    a = torch.rand(2, 4, 4, requires_grad=True)
    attention_mse(a, mask.expand(2, 4, 4)).sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same shape"):
        attention_mse(torch.rand(1, 4, 4), torch.rand(1, 3, 4))


# ---------------------------------------------------------------------------------------- training


def test_one_token_per_concept_and_one_prompt_per_step(pipe, image):
    # A ConceptExpress config (split-and-merge, contrastive) is reduced to BaS†: g = 1, no merge.
    tr = _trainer(pipe, image, steps=6, merge_step=2, split_tokens=5)
    assert tr.g == 1 and tr.vectors.shape[0] == 3
    assert not tr.config.split_merge and not tr.config.contrastive
    preview = tr.prompts()
    assert len(preview) == 1 and tr.prompts()[0].concepts == preview[0].concepts  # a preview consumes nothing
    result = tr.train()
    assert [r["prompts"] for r in result.history] == [1] * 6
    assert result.sample_passes == 6 and result.optimizer_steps == 6
    assert list(result.history[0]["concepts"]) == list(preview[0].concepts)  # the preview was the real draw
    subsets = [tuple(r["concepts"]) for r in result.history]
    assert all(len(s) >= 1 and len(set(s)) == len(s) for s in subsets)
    assert len(set(subsets)) > 1  # the subset changes from step to step
    assert {r["phase"] for r in result.history} == {"union"}
    assert all(r["con"] == 0.0 for r in result.history)
    assert result.embeddings.shape == (3, pipe.text_encoder.get_input_embeddings().embedding_dim)


def test_subsets_are_seeded_and_cover_every_concept(pipe, image):
    def subsets(seed):
        tr = _trainer(pipe, image, seed=seed)
        seen = []
        for _ in range(12):  # the draws alone, without UNet passes: prompts() previews, the step consumes
            seen.append(tuple(tr.prompts()[0].concepts))
            sample_union(tr.n, tr.generator)  # what the step draws first
        return seen

    a = subsets(0)
    assert a == subsets(0) and a != subsets(1)
    assert set().union(*map(set, a)) == {0, 1, 2}


def test_loss_uses_the_union_mask_of_the_sampled_concepts(pipe, image, monkeypatch):
    seen = []
    original = losses.masked_denoising_loss

    def spy(pred, target, mask):
        seen.append(mask.detach().cpu().bool().clone())
        return original(pred, target, mask)

    monkeypatch.setattr(losses, "masked_denoising_loss", spy)
    masks, _ = _concepts()
    result = _trainer(pipe, image, steps=5, flip_p=0.0).train()
    assert len(seen) == 5
    for record, mask in zip(result.history, seen):
        union = masks[list(record["concepts"])].any(0)
        assert mask.shape == (1, *LATENT) and torch.equal(mask[0], union)


def test_attention_term_weight_and_switch(pipe, image):
    on = _trainer(pipe, image, steps=2).train().history
    for r in on:
        assert r["reg"] > 0
        assert r["loss"] == pytest.approx(r["mse"] + LAMBDA_ATTENTION * r["reg"], rel=1e-12)
    off = _trainer(pipe, image, steps=2, attn_reg=False).train().history
    assert all(r["reg"] == 0.0 for r in off)
    masks, cents = _concepts()
    tr = BaSTrainer(pipe, image, WORK, masks, cents, TrainConfig(steps=1), lambda_attention=0.5)
    assert tr.attention_weight == 0.5
    from conceptexpress.errors import ConfigError

    with pytest.raises(ConfigError, match="lambda_attention"):
        BaSTrainer(pipe, image, WORK, masks, cents, TrainConfig(steps=1), lambda_attention=-1.0)


def _first_step_grad(pipe, image, lam: float, **kw) -> torch.Tensor:
    masks, cents = _concepts()
    cfg = TrainConfig(steps=1, checkpoint_every=0, **kw)
    tr = BaSTrainer(pipe, image, WORK, masks, cents, cfg, lambda_attention=lam)
    grads = {}
    original = tr._apply

    def capture(grad):
        grads["g"] = grad.detach().clone()
        original(grad)

    tr._apply = capture
    tr.train()
    return grads["g"]


def test_attention_term_reaches_the_token_gradients(pipe, image):
    strong = _first_step_grad(pipe, image, 1e3)
    ckpt = _first_step_grad(pipe, image, 1e3, gradient_checkpointing=True)
    off = _first_step_grad(pipe, image, 1e3, attn_reg=False)
    torch.testing.assert_close(ckpt, strong, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(strong, off, rtol=1e-3, atol=1e-7)


def test_only_new_rows_train(pipe, image):
    emb = pipe.text_encoder.get_input_embeddings()
    before = emb.weight.detach().clone()
    tr = _trainer(pipe, image, steps=2)
    init = tr.vectors.detach().clone()
    tr.train()
    assert pipe.text_encoder.get_input_embeddings() is emb  # wrapper removed
    assert torch.equal(emb.weight, before)  # every existing row bit-for-bit unchanged
    assert not torch.equal(tr.vectors.detach(), init)
    for row in init:
        assert (before == row).all(1).any()  # random init = existing vocabulary rows


def test_resume_is_bit_for_bit(pipe, image, tmp_path):
    straight = _trainer(pipe, image, steps=6).train()

    class Interrupt(Exception):
        pass

    def stop_at_3(trainer, record):
        if record["step"] == 3:
            raise Interrupt

    first = _trainer(pipe, image, steps=6, checkpoint_every=3)
    with pytest.raises(Interrupt):
        first.train(checkpoint_dir=tmp_path, callbacks=[stop_at_3])
    resumed = _trainer(pipe, image, steps=6, checkpoint_every=3)
    result = resumed.train(checkpoint_dir=tmp_path, resume=True)
    assert torch.equal(result.embeddings, straight.embeddings)
    assert [r["concepts"] for r in result.history] == [r["concepts"] for r in straight.history]
    assert [r["loss"] for r in result.history] == [r["loss"] for r in straight.history]
    assert result.sample_passes == straight.sample_passes == 6


def test_resume_refuses_a_conceptexpress_checkpoint(pipe, image, tmp_path):
    from conceptexpress.errors import ConfigError

    masks, cents = _concepts()
    # Same resolved TrainConfig as BaS† (no SnM, no contrastive): only the method tells them apart.
    cfg = TrainConfig(steps=2, checkpoint_every=1, split_merge=False, contrastive=False)
    TokenTrainer(pipe, image, WORK, masks, cents, cfg).train(checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="another image"):
        BaSTrainer(pipe, image, WORK, masks, cents, cfg).train(checkpoint_dir=tmp_path, resume=True)


def test_extract_with_bas_dagger(tiny_sd2_dir, tmp_path):
    from conceptexpress.cli import main

    out = tmp_path / "run"
    args = ["-q", "extract", str(EXAMPLE), "--method", "bas-dagger", "--model", str(tiny_sd2_dir)]
    code = main([*args, "--out", str(out), "--device", "cpu", "--steps", "3", "--no-samples"])
    assert code == 0
    m = json.loads((out / "manifest.json").read_text())
    n = m["num_concepts"]
    assert m["method"] == "bas-dagger" and m["complete"] is True
    assert len(m["tokens"]) == n >= 1 and m["steps"] == 3 and m["sample_passes"] == 3
    for t in m["tokens"]:
        assert (out / t["file"]).is_file()
    history = json.loads((out / "history.json").read_text())
    assert all(1 <= len(r["concepts"]) <= n for r in history)
