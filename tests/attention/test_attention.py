"""Attention capture (diffusers processors) and aggregation (pure torch), on the tiny random pipelines."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F

from conceptexpress.attention import (
    CapturingAttnProcessor,
    CrossAttentionAccumulator,
    SelfAttentionAccumulator,
    capture_attention,
    layer_hw,
)
from conceptexpress.models.family import family_of
from conceptexpress.models.text import eot_index

# ---------------------------------------------------------------------------------------------------------------
# helpers


def _inputs(pipe, hw, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *hw, generator=g)  # (B, 4, h, w)
    t = torch.tensor([0, 500][:batch])
    with torch.no_grad():
        family = family_of(pipe)
        emb = family.encode(pipe, family.tokenize(pipe, ["", "a photo of"][:batch])).context  # (B, 77, D)
    return x, t, emb


def _processor_types(unet):
    return {k: type(v) for k, v in unet.attn_processors.items()}


def _attention(unet, name):
    return dict(unet.named_modules())[name]


def _naive_self_aggregate(layers, latent_hw, weighting):
    """Reference: materialize every layer's (h*w, h*w) map with F.interpolate on both axes, then sum."""
    h, w = latent_hw
    total = 0
    for probs, (h_l, w_l) in layers:
        a = probs.double().mean(1)  # (B, q, k)
        B = a.shape[0]
        keys = F.interpolate(
            a.reshape(B * h_l * w_l, 1, h_l, w_l), size=(h, w), mode="bilinear", align_corners=False
        )
        keys = keys.reshape(B, h_l * w_l, h * w)  # (B, q, hw)
        if weighting == "diffseg":
            keys = keys / keys.sum(-1, keepdim=True)
        q = keys.transpose(1, 2).reshape(B, h * w, h_l, w_l)  # (B, hw_key, h_l, w_l)
        q = (
            F.interpolate(q, size=(h, w), mode="nearest").reshape(B, h * w, h * w).transpose(1, 2)
        )  # (B, hw, hw)
        total = total + q * (h_l / h)
    return total / total.sum(-1, keepdim=True), total


def _random_probs(batch, heads, n, k=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, heads, n, k or n, generator=g).mul(3).softmax(-1)  # (B, heads, q, k)


# ---------------------------------------------------------------------------------------------------------------
# pure aggregation


def test_layer_hw_ceil_halving():
    assert layer_hw((16, 16), 256) == (16, 16)
    assert layer_hw((16, 16), 16) == (4, 4)
    assert layer_hw((64, 96), 8 * 12) == (8, 12)
    assert layer_hw((16, 11), 48) == (8, 6)
    assert layer_hw((16, 11), 12) == (4, 3)
    with pytest.raises(ValueError, match="latent_hw"):
        layer_hw((16, 11), 50)


@pytest.mark.parametrize("latent_hw", [(8, 8), (8, 6), (7, 5)])
@pytest.mark.parametrize("weighting", ["released", "diffseg"])
def test_self_accumulator_matches_naive_reference(latent_hw, weighting):
    shapes = [latent_hw]
    while shapes[-1] != (1, 1) and len(shapes) < 3:
        shapes.append(tuple(-(-s // 2) for s in shapes[-1]))
    layers = [(_random_probs(2, 3, hh * ww, seed=i), (hh, ww)) for i, (hh, ww) in enumerate(shapes)]
    acc = SelfAttentionAccumulator(latent_hw, weighting=weighting)
    for probs, hw in layers:
        acc.add(probs, hw)
    ref, ref_raw = _naive_self_aggregate(layers, latent_hw, weighting)
    n = latent_hw[0] * latent_hw[1]
    assert acc.num_layers == len(layers)
    assert acc.result().shape == (2, n, n) and acc.result().dtype == torch.float32
    torch.testing.assert_close(acc.result().double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(acc.result(normalize=False).double(), ref_raw, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(acc.result().sum(-1), torch.ones(2, n))


def test_weightings_differ_and_released_weight_is_latent_over_res():
    latent = (8, 8)
    layers = [(_random_probs(1, 2, 64, seed=1), (8, 8)), (_random_probs(1, 2, 4, seed=2), (2, 2))]
    results = {}
    for weighting in ("released", "diffseg"):
        acc = SelfAttentionAccumulator(latent, weighting=weighting)
        for probs, hw in layers:
            acc.add(probs, hw)
        results[weighting] = acc.result()
    assert not torch.allclose(results["released"], results["diffseg"], atol=1e-3)
    # Effective per-layer weight = each row's mass after resizing and weighting: released h/h_l, diffseg h_l/h.
    for weighting, expected in (("released", {8: 1.0, 2: 4.0}), ("diffseg", {8: 1.0, 2: 0.25})):
        for probs, hw in layers:
            acc = SelfAttentionAccumulator(latent, weighting=weighting)
            acc.add(probs, hw)
            rows = acc.result(normalize=False).sum(-1)  # (1, 64)
            torch.testing.assert_close(rows, torch.full_like(rows, expected[hw[0]]), rtol=1e-5, atol=1e-6)


def test_self_accumulator_rejects_bad_input():
    with pytest.raises(ValueError, match="weighting"):
        SelfAttentionAccumulator((8, 8), weighting="mean")
    acc = SelfAttentionAccumulator((8, 8))
    with pytest.raises(ValueError, match="layer_hw"):
        acc.add(_random_probs(1, 2, 16), (8, 8))
    with pytest.raises(RuntimeError, match="before any layer"):
        acc.result()


def test_cross_accumulator_picks_token_columns_and_keeps_grad():
    B, heads, hw, K = 2, 2, (4, 4), 7
    pattern = torch.rand(B, 16)  # (B, q) what the picked token attends
    probs = torch.full((B, heads, 16, K), 0.0)
    probs[0, :, :, 3] = pattern[0]
    probs[1, :, :, 5] = pattern[1]
    # Shared indices: token 3 is picked for both batch elements.
    acc = CrossAttentionAccumulator((8, 8), [3])
    acc.add(probs, hw)
    acc.add(probs, hw)
    expected = F.interpolate(pattern[0].view(1, 1, 4, 4), size=(8, 8), mode="bilinear", align_corners=False)
    out = acc.result()  # (B, 1, 8, 8)
    assert out.shape == (B, 1, 8, 8) and acc.num_layers == 2
    torch.testing.assert_close(out[0, 0], expected[0, 0])
    assert out[1].abs().max() == 0
    # Per-batch indices: element 0 reads token 3, element 1 token 5 (and a second, empty column).
    acc = CrossAttentionAccumulator((4, 4), torch.tensor([[3, 0], [5, 0]]))
    acc.add(probs, hw)
    out = acc.result()  # (B, 2, 4, 4)
    torch.testing.assert_close(out[:, 0].reshape(B, 16), pattern)
    assert out[:, 1].abs().max() == 0
    # keep_grad: the gradient reaches the logits behind the probabilities; the default detaches.
    logits = torch.randn(B, heads, 16, K, requires_grad=True)
    acc = CrossAttentionAccumulator((8, 8), [3], keep_grad=True)
    acc.add(logits.softmax(-1), hw)
    acc.result().pow(2).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    acc = CrossAttentionAccumulator((8, 8), [3])
    acc.add(logits.softmax(-1), hw)
    assert not acc.result().requires_grad
    with pytest.raises(ValueError, match="token_indices"):
        CrossAttentionAccumulator((8, 8), [9]).add(probs, hw)


# ---------------------------------------------------------------------------------------------------------------
# capture on the tiny UNet


@pytest.mark.parametrize("latent_hw", [(16, 16), (16, 12), (16, 11)])
def test_capture_is_transparent_and_restores_processors(tiny_pipe, latent_hw):
    unet = tiny_pipe.unet.eval()
    before = _processor_types(unet)
    originals = dict(unet.attn_processors)
    x, t, emb = _inputs(tiny_pipe, latent_hw)
    sa = SelfAttentionAccumulator(latent_hw)
    ca = CrossAttentionAccumulator(latent_hw, [eot_index(tiny_pipe.tokenizer)])
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=emb).sample
        with capture_attention(unet, latent_hw, self_attention=sa, cross_attention=ca) as installed:
            during = _processor_types(unet)
            out = unet(x, t, encoder_hidden_states=emb).sample
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert _processor_types(unet) == before
    assert all(unet.attn_processors[k] is v for k, v in originals.items())
    # Only the layers that feed an accumulator were swapped: all attn1, and the attn2 at latent/4.
    n_self = sum(k.endswith("attn1.processor") for k in before)
    cross = sorted(k for k in installed if k.endswith("attn2.processor"))
    assert cross == [
        "down_blocks.2.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
    ]
    assert sum(v is CapturingAttnProcessor for v in during.values()) == n_self + 3
    assert sa.num_layers == n_self and ca.num_layers == 3
    # Aggregated self-attention: (B, hw, hw), rows are distributions; [EOT] map at latent size.
    n = latent_hw[0] * latent_hw[1]
    A = sa.result()
    assert A.shape == (2, n, n) and torch.isfinite(A).all() and (A >= 0).all()
    torch.testing.assert_close(A.sum(-1), torch.ones(2, n))
    assert ca.result().shape == (2, 1, *latent_hw)


@pytest.mark.parametrize(
    ("layer", "head_chunk"),
    [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1", None),
        ("up_blocks.1.attentions.1.transformer_blocks.0.attn2", None),
        ("down_blocks.2.attentions.0.transformer_blocks.0.attn1", 1),
    ],
)
def test_captured_probs_equal_manual_softmax(tiny_pipe, layer, head_chunk):
    unet = tiny_pipe.unet.eval()
    attn = _attention(unet, layer)
    latent_hw = (16, 16)
    x, t, emb = _inputs(tiny_pipe, latent_hw)
    seen, captured = {}, []

    def grab(module, args, kwargs):
        seen["x"] = args[0]
        seen["ctx"] = kwargs.get("encoder_hidden_states")

    original = attn.processor
    hook = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=emb).sample
        attn.set_processor(
            CapturingAttnProcessor(lambda p, hw: captured.append((p, hw)), latent_hw, head_chunk=head_chunk)
        )
        try:
            out = unet(x, t, encoder_hidden_states=emb).sample
        finally:
            attn.set_processor(original)
            hook.remove()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    ((probs, hw),) = captured
    with torch.no_grad():
        ctx = seen["x"] if seen["ctx"] is None else seen["ctx"]
        B, d = seen["x"].shape[0], attn.to_q.out_features // attn.heads
        q = attn.to_q(seen["x"]).view(B, -1, attn.heads, d).transpose(1, 2)  # (B, heads, q, d)
        k = attn.to_k(ctx).view(B, -1, attn.heads, d).transpose(1, 2)  # (B, heads, k, d)
        expected = (q @ k.transpose(-1, -2) / d**0.5).softmax(-1)  # (B, heads, q, k)
    if head_chunk is not None:
        expected = expected.mean(1, keepdim=True)  # a chunked processor hands out the head mean
    assert hw == layer_hw(latent_hw, expected.shape[2])
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_processors_restored_on_exception(tiny_pipe):
    unet = tiny_pipe.unet
    before = _processor_types(unet)
    with (
        pytest.raises(KeyError, match="boom"),
        capture_attention(unet, (16, 16), self_attention=SelfAttentionAccumulator((16, 16))),
    ):
        raise KeyError("boom")
    assert _processor_types(unet) == before
    # An error raised inside the UNet (wrong latent_hw) also restores them.
    x, t, emb = _inputs(tiny_pipe, (16, 16))
    with (
        pytest.raises(ValueError, match="latent_hw"),
        torch.no_grad(),
        capture_attention(unet, (12, 12), self_attention=SelfAttentionAccumulator((12, 12))),
    ):
        unet(x, t, encoder_hidden_states=emb)
    assert _processor_types(unet) == before
    assert not unet._forward_pre_hooks and not unet._forward_hooks


def test_capture_rejects_missing_cross_level(tiny_pipe):
    ca = CrossAttentionAccumulator((16, 16), [1])
    # latent/16 is below the lowest attention level of the tiny UNet (latent/8)
    with (
        pytest.raises(ValueError, match="no cross-attention layer"),
        capture_attention(tiny_pipe.unet, (16, 16), cross_attention=ca, cross_downsample=16),
    ):
        pass
    with (
        pytest.raises(ValueError, match="power of two"),
        capture_attention(tiny_pipe.unet, (16, 16), cross_attention=ca, cross_downsample=3),
    ):
        pass


def _train_step(unet, x, t, emb0, latent_hw):
    """Forward + backward with capture; the loss reads the cross-attention maps only."""
    emb = emb0.clone().requires_grad_(True)  # leaf standing in for learned token embeddings
    sa = SelfAttentionAccumulator(latent_hw)
    ca = CrossAttentionAccumulator(latent_hw, torch.tensor([[3, 5], [4, 6]]), keep_grad=True)
    with capture_attention(unet, latent_hw, self_attention=sa, cross_attention=ca):
        unet(x, t, encoder_hidden_states=emb)
        loss = ca.result().pow(2).sum()
        loss.backward()  # inside the block: the checkpoint recomputes with the capturing processors
    return sa, ca, emb.grad


def test_capture_under_gradient_checkpointing(tiny_pipe, caplog):
    unet = copy.deepcopy(tiny_pipe.unet).train()
    latent_hw = (16, 12)
    x, t, emb = _inputs(tiny_pipe, latent_hw)
    sa0, ca0, grad0 = _train_step(unet, x, t, emb, latent_hw)

    unet.enable_gradient_checkpointing()
    calls = []
    layer = _attention(unet, "up_blocks.1.attentions.0.transformer_blocks.0.attn2")
    hook = layer.register_forward_hook(lambda *a: calls.append(1))
    sa1, ca1, grad1 = _train_step(unet, x, t, emb, latent_hw)
    hook.remove()
    assert len(calls) == 2, "the checkpointed block should run twice (forward + recomputation)"
    # Same layers counted once, same maps, same gradient: the recomputation added nothing.
    assert (sa1.num_layers, ca1.num_layers) == (sa0.num_layers, ca0.num_layers)
    torch.testing.assert_close(sa1.result(), sa0.result())
    torch.testing.assert_close(ca1.result(), ca0.result())
    assert grad0 is not None and grad0.abs().sum() > 0
    torch.testing.assert_close(grad1, grad0)

    # Leaving the block before backward is reported (the recomputation would use other processors).
    with caplog.at_level(logging.WARNING), capture_attention(unet, latent_hw, self_attention=sa1):
        unet(x, t, encoder_hidden_states=emb.clone().requires_grad_(True))
    assert "backward inside the `with` block" in caplog.text

    # A reentrant checkpoint runs blocks without autograd: the keep_grad capture refuses instead of losing grads.
    def reentrant(module, *args):
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=True)

    unet.enable_gradient_checkpointing(reentrant)
    with pytest.raises(RuntimeError, match="reentrant"):
        _train_step(unet, x, t, emb, latent_hw)


# ---------------------------------------------------------------------------------------------------------------
# token positions


def test_eot_index_both_paddings(tiny_sd1_dir, tiny_sd2_dir):
    from transformers import CLIPTokenizer

    for path in (tiny_sd1_dir, tiny_sd2_dir):
        tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
        assert eot_index(tok, "") == 1
        # The tiny byte-level vocabulary spells words out: "a photo of" is 8 tokens, [EOT] right after them.
        n = len(tok.tokenize("a photo of"))
        assert n == 8 and eot_index(tok, "a photo of") == 1 + n
        ids = tok("", padding="max_length", max_length=tok.model_max_length).input_ids
        if tok.pad_token_id == tok.eos_token_id:
            # SD 1.x pads with [EOT]: "the end token" is ambiguous, the last occurrence is the last pad.
            assert len(ids) - 1 - ids[::-1].index(tok.eos_token_id) == tok.model_max_length - 1
        # argmax of the ids finds [EOT] only while it has the largest id: added (learned) tokens break that.
        tok.add_tokens(["<v1>"])
        ids = tok("a photo of <v1>", padding="max_length", max_length=tok.model_max_length).input_ids
        assert int(torch.tensor(ids).argmax()) == 1 + n
        assert eot_index(tok, "a photo of <v1>") == 2 + n


def test_aggregate_does_not_import_diffusers(heavy_imports):
    assert "diffusers" not in heavy_imports["conceptexpress.attention"]
