"""Token learning on the tiny random pipeline: schedule, merge, frozen rows, resume, checkpointing, ablations."""

from __future__ import annotations

import itertools

import pytest
import torch

from conceptexpress.config import TrainConfig
from conceptexpress.errors import ConfigError
from conceptexpress.learn.trainer import TokenTrainer, released_sample_passes

WORK = (128, 88)  # the tiny model's working size for the 600×400 example
LATENT = (11, 16)


def _concepts(n: int = 2):
    """Two rectangles on the 11×16 latent and centroids peaked on them (row-stochastic)."""
    masks = torch.zeros(n, *LATENT, dtype=torch.bool)
    masks[0, 2:6, 2:7] = True
    masks[1, 5:10, 9:14] = True
    cents = masks.flatten(1).float() + 0.05
    return masks[:n], cents[:n] / cents[:n].sum(1, keepdim=True)


def _trainer(pipe, image, **kw) -> TokenTrainer:
    masks, cents = _concepts()
    cfg = TrainConfig(**{"steps": 4, "merge_step": 2, "split_tokens": 3, "micro_batch": 4, "checkpoint_every": 0, **kw})
    return TokenTrainer(pipe, image, WORK, masks, cents, cfg)


def test_only_new_rows_train_and_pipeline_restored(pipe, image):
    emb = pipe.text_encoder.get_input_embeddings()
    before = emb.weight.detach().clone()
    tr = _trainer(pipe, image)
    init = tr.vectors.detach().clone()
    result = tr.train()
    assert pipe.text_encoder.get_input_embeddings() is emb  # wrapper removed
    assert torch.equal(emb.weight, before)  # every existing row bit-for-bit unchanged
    assert not torch.equal(tr.vectors.detach(), init)  # the new tokens did move
    assert result.embeddings.shape == (2, emb.embedding_dim)


def test_init_is_seeded_vocabulary_rows(pipe, image):
    a, b, c = _trainer(pipe, image, seed=1), _trainer(pipe, image, seed=1), _trainer(pipe, image, seed=2)
    assert torch.equal(a.vectors, b.vectors) and not torch.equal(a.vectors, c.vectors)
    vocab = pipe.text_encoder.get_input_embeddings().weight
    for row in a.vectors:
        assert (vocab == row).all(1).any()  # each init is an existing vocabulary embedding


def test_merge_is_mean_of_split_tokens(pipe, image):
    tr = _trainer(pipe, image)
    v = tr.vectors.detach().clone()  # (g·N, D), row j·N + i = split token j of concept i
    tr.merge()
    expected = v.view(3, 2, -1).mean(0)
    torch.testing.assert_close(tr.vectors.detach()[:2], expected, rtol=0, atol=0)


def test_schedule_prompts_and_sample_passes(pipe, image):
    tr = _trainer(pipe, image, update_rule="batched")
    assert len(tr.split_prompts) == 6 and len(tr.merged_prompts) == 3
    assert tr.merged_prompts[-1].slots == (0, 1)  # joint prompt "a photo of [V1] and [V2]"
    result = tr.train()
    assert [r["prompts"] for r in result.history] == [6, 6, 3, 3]
    assert result.sample_passes == 18 and result.optimizer_steps == 4
    assert released_sample_passes(2, tr.config) == 2 * (2 * 3 * 2 + 2 * 3)
    assert {r["phase"] for r in result.history[:2]} == {"split"} and result.history[-1]["phase"] == "merged"


def test_released_rule_steps_once_per_prompt(pipe, image):
    assert TrainConfig().update_rule == "released"  # the default: the authors' dynamics (DESIGN §4)
    result = _trainer(pipe, image).train()
    assert result.optimizer_steps == 18  # 6 + 6 + 3 + 3, one AdamW step per prompt
    assert result.sample_passes == 18  # from one batched pass per step


def test_token_gradient_is_clipped_to_max_grad_norm(pipe, image):
    assert TrainConfig().max_grad_norm == 1.0  # released: --max_grad_norm 1.0
    seen = []

    def spy(tr):
        original = tr.optimizer.step

        def step(*args, **kwargs):
            seen.append(float(tr.vectors.grad.norm()))
            return original(*args, **kwargs)

        tr.optimizer.step = step
        return tr

    # alpha large enough that the unclipped norm exceeds the limits below.
    clipped = spy(_trainer(pipe, image, steps=1, merge_step=1, alpha=100.0, max_grad_norm=0.01)).train()
    assert clipped.history[0]["grad_norm"] > 0.01
    assert max(seen) == pytest.approx(0.01, rel=1e-4)  # every replayed step clipped to the limit
    seen.clear()
    free = spy(_trainer(pipe, image, steps=1, merge_step=1, alpha=100.0, max_grad_norm=0)).train()
    assert max(seen) == pytest.approx(free.history[0]["grad_norm"], rel=1e-5) and max(seen) > 0.01
    with pytest.raises(ConfigError, match="max_grad_norm"):
        TrainConfig(max_grad_norm=-1.0)


def test_micro_batching_does_not_change_the_step(pipe, image):
    a = _trainer(pipe, image, micro_batch=1, steps=1).train().embeddings
    b = _trainer(pipe, image, micro_batch=0, steps=1).train().embeddings
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_is_bit_for_bit(pipe, image, tmp_path):
    straight = _trainer(pipe, image, steps=6, merge_step=3).train()

    class Interrupt(Exception):
        pass

    def stop_at_3(trainer, record):
        if record["step"] == 3:
            raise Interrupt

    first = _trainer(pipe, image, steps=6, merge_step=3, checkpoint_every=3)
    with pytest.raises(Interrupt):
        first.train(checkpoint_dir=tmp_path, callbacks=[stop_at_3])
    resumed = _trainer(pipe, image, steps=6, merge_step=3, checkpoint_every=3)
    ran = []
    result = resumed.train(checkpoint_dir=tmp_path, resume=True, callbacks=[lambda tr, record: ran.append(record["step"])])
    assert ran == [4, 5, 6]  # continued from the checkpoint: a restart from step 0 would run six steps
    assert torch.equal(result.embeddings, straight.embeddings)
    assert [r["loss"] for r in result.history] == [r["loss"] for r in straight.history]
    assert result.sample_passes == straight.sample_passes


def test_resume_accepts_another_micro_batch(pipe, image, tmp_path):
    # After an out-of-memory crash the run continues with a smaller micro-batch: runtime settings are not part of
    # the checkpoint's fingerprint, and micro-batching does not change a step.
    straight = _trainer(pipe, image, steps=4, merge_step=2, micro_batch=0).train()

    class OutOfMemory(Exception):
        pass

    def crash_after_2(trainer, record):
        if record["step"] == 2:
            raise OutOfMemory

    with pytest.raises(OutOfMemory):
        _trainer(pipe, image, steps=4, merge_step=2, micro_batch=0, checkpoint_every=2).train(
            checkpoint_dir=tmp_path, callbacks=[crash_after_2]
        )
    ran = []
    result = _trainer(pipe, image, steps=4, merge_step=2, micro_batch=1, checkpoint_every=2).train(
        checkpoint_dir=tmp_path, resume=True, callbacks=[lambda tr, record: ran.append(record["step"])]
    )
    assert ran == [3, 4]
    torch.testing.assert_close(result.embeddings, straight.embeddings, rtol=1e-5, atol=1e-6)


def test_resume_refuses_foreign_checkpoint(pipe, image, tmp_path):
    from conceptexpress.errors import ConfigError

    _trainer(pipe, image, steps=2, checkpoint_every=1).train(checkpoint_dir=tmp_path)
    with pytest.raises(ConfigError, match="another image"):
        _trainer(pipe, image, steps=2, checkpoint_every=1, lr=1e-3).train(checkpoint_dir=tmp_path, resume=True)


def _first_step_grad(pipe, image, **kw) -> torch.Tensor:
    tr = _trainer(pipe, image, steps=1, merge_step=0, micro_batch=0, **kw)
    grads = {}
    original = tr._apply

    def capture(grad):
        grads.setdefault("g", grad.detach().clone())  # the first optimizer step's gradient
        return original(grad)

    tr._apply = capture
    tr.train()
    return grads["g"]


def test_gradient_checkpointing_keeps_the_emd_term(pipe, image):
    plain = _first_step_grad(pipe, image, beta=1e3)
    ckpt = _first_step_grad(pipe, image, beta=1e3, gradient_checkpointing=True)
    no_reg = _first_step_grad(pipe, image, beta=1e3, gradient_checkpointing=True, attn_reg=False)
    torch.testing.assert_close(ckpt, plain, rtol=1e-4, atol=1e-7)
    assert not torch.allclose(ckpt, no_reg, rtol=1e-3, atol=1e-7)  # the EMD term changes the token gradients


@pytest.mark.parametrize("snm, reg, con", list(itertools.product([True, False], repeat=3)))
def test_every_ablation_combination_runs(pipe, image, snm, reg, con):
    result = _trainer(pipe, image, steps=2, merge_step=1, split_merge=snm, attn_reg=reg, contrastive=con).train()
    assert torch.isfinite(result.embeddings).all()
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history)
    split = result.history[0]  # step 1: the split phase (merge after step 1)
    # The ablated term is exactly zero, the kept one is not (split phase: the contrastive loss needs g > 1).
    assert all(r["reg"] == 0.0 for r in result.history) != reg
    assert (split["con"] == 0.0) != (con and snm)
    assert result.history[1]["con"] == 0.0  # contrastive loss: split phase only
    assert split["prompts"] == (2 * 3 if snm else 2)  # g = 3 split tokens per concept, or one token per concept


def test_half_precision_weights_train_fp32_vectors(tiny_sd2_dir, image):
    """bf16 weights (the GPU path minus autocast, which is CUDA-only): vectors stay fp32, losses finite."""
    from conceptexpress.models import load_pipeline

    pipe = load_pipeline(str(tiny_sd2_dir), device="cpu", dtype="bf16")
    masks, cents = _concepts()
    tr = TokenTrainer(pipe, image, WORK, masks, cents, TrainConfig(steps=2, merge_step=1, split_tokens=2, checkpoint_every=0))
    result = tr.train()
    assert tr.vectors.dtype == torch.float32 and torch.isfinite(result.embeddings).all()
    assert all(r["mse"] > 0 for r in result.history)


def test_batched_sinkhorn_emd_path_trains(pipe, image):
    """The GPU default (one batched Sinkhorn call per step) also runs on CPU and stays close to exact EMD."""
    exact = _trainer(pipe, image, steps=1, emd_method="exact").train()
    sinkhorn = _trainer(pipe, image, steps=1, emd_method="sinkhorn").train()
    assert sinkhorn.history[0]["reg"] == pytest.approx(exact.history[0]["reg"], rel=0.05, abs=1e-3)
    assert torch.isfinite(sinkhorn.embeddings).all()
