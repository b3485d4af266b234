"""GPU memory and FLOPs of token learning and localization, simulated on the CPU with fake tensors (issue 27, item 7).

Runs the package's real code — one ``TokenTrainer.train_step()`` (through ``TokenTrainer.train`` with one step)
and one ``ConceptLocalizer.attention`` pass — on the full-size architectures (SD 2.1-base at 512 px, SDXL base at
1024 px) under ``torch._subclasses.fake_tensor.FakeTensorMode``: every tensor has its real shape, dtype and
device but no storage, so nothing is computed and a 2.6 B-parameter UNet costs no memory. Two dispatch modes watch
every ATen op: ``torch.utils.flop_counter.FlopCounterMode`` counts FLOPs, :class:`LiveBytes` counts the bytes of
the live device storages (each storage once, freed when its last tensor dies) and keeps the peak. Prints one
JSON row per setting::

    {model, resolution, stage, precision, micro_batch, checkpointing, peak_gb, tflop_per_step,
     est_h100_s_per_image, ...}

``peak_gb`` is GiB (2**30 bytes) of live tensors: what ``torch.cuda.max_memory_allocated`` would report. A card
needs more: the CUDA context and cuBLAS/cuDNN workspaces (~0.5–1 GiB) and the caching allocator's fragmentation
(typically 5–15 %) come on top.

Assumptions (each chosen to be what the real code would allocate on a CUDA GPU):

1. **The device is CUDA.** Tensors are fake ``cuda:0`` tensors; ``torch.autocast("cuda")`` and
   ``torch.amp.GradScaler("cuda")`` are enabled although this torch build has no CUDA (their availability checks
   are patched), so CUDA autocast's op lists apply (e.g. group/layer norm outputs in fp32) and the trainer takes
   its CUDA branches (batched Sinkhorn EMD instead of POT's exact EMD; fp16 loss scaling).
2. **Weights as a user loads them with ``--dtype fp16``**: UNet, text encoder(s) and VAE in fp16 for every row,
   also the bf16 rows (bf16 autocast then casts each weight per call, transiently, as it would on a GPU). SDXL's
   VAE is held in fp32 (``force_upcast``: it overflows in fp16). Token vectors and their AdamW state are fp32.
3. **Flash attention.** diffusers' default processor calls ``F.scaled_dot_product_attention``; on an H100 with
   fp16/bf16 and head size 64 that is the flash kernel (no (q, k) matrix), so it is replaced by
   ``aten._scaled_dot_product_flash_attention`` (+ its backward) here — the CPU build would fall back to the math
   path and materialize every attention matrix. The layers the package captures (the cross-attention at latent/4
   for the EMD, every self-attention layer while localizing) use its own processor, which materializes the
   probabilities, exactly as on a GPU.
4. **Data-dependent scalars** (``float(loss)``, ``bool(isfinite(...).all())``, ``.item()``) have no value under fake
   tensors: :class:`LiveBytes` answers them (True, 1) so that control flow takes the ordinary path (no overflow, no
   clipping). No memory depends on those values.
5. **Trainer parts patched at run time** (``src/`` is untouched): ``TokenTrainer._initial_vectors`` (draws
   vocabulary rows with ``nonzero``, whose output shape depends on data) returns fp32 zeros of the same shape, and
   ``TokenTrainer._make_fingerprint`` (hashes tensors' bytes) returns a constant. Neither runs in the step.
6. **Cost of one image** (DESIGN §9): 500 steps, N = 3 concepts, g = 5: 100 split steps of g·N = 15 prompts and
   400 merged steps of N + 1 = 4 prompts (3,100 sample-passes), plus one localization pass.
   ``est_h100_s_per_image`` = (100·split-step FLOPs + 400·merged-step FLOPs + localization FLOPs) /
   (40 % × 989 TFLOP/s, the H100 SXM's dense bf16 peak). FLOPs are those of matmuls, convolutions and attention
   (FlopCounterMode's registry); elementwise work is not counted — the 40 % utilization stands for it.
   ``tflop_per_step`` is the split-phase step (15 prompts; the merged step is ``tflop_merged_step``). Gradient
   checkpointing re-runs the checkpointed blocks' forward in the backward, which the FLOPs include.
7. **Peak** = max over the trainer's construction (VAE encode of the photo, ``init_peak_gb``) and the split-phase
   step (``step_peak_gb``): the split step has the most prompts per micro-batch (min(micro_batch, 15)), so the
   merged phase (min(micro_batch, 4)) never needs more.
8. **SDXL.** The SDXL architecture is built here from DESIGN §9's facts (TODO: switch to
   ``conceptexpress.testing.sdxl_random_pipeline`` once it lands). SDXL rows run the same code path as SD 2.1
   (``TokenTrainer``, ``ConceptLocalizer.attention``) as soon as those accept an SDXL pipeline; until then the
   trainer or localizer raises and the row comes from a proxy that mirrors them with the package's own pieces
   (``ModelFamily.encode`` with both encoders spliced, pooled embedding and time ids, the same capture,
   masked ε-MSE and batched EMD) and says so: ``"stage": "unet_step_proxy"`` / ``"localize_proxy"`` with the
   trainer's or localizer's error in ``"proxy_reason"``.

    PYTHONPATH=src python benchmarks/memory.py                  # both models, the full grid (~15 min on 2 cores)
    PYTHONPATH=src python benchmarks/memory.py --models sd21 --precisions bf16 --micro-batches 4
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.weak import WeakIdKeyDictionary

GIB = 2**30
H100_BF16_DENSE = 989e12  # FLOP/s, H100 SXM dense bf16 (no sparsity)
UTILIZATION = 0.4
SPLIT_STEPS, MERGED_STEPS, CONCEPTS = 100, 400, 3
DEVICE = torch.device("cpu")  # the simulated GPU: see the module docstring, 1
aten = torch.ops.aten


# ---------------------------------------------------------------------------------------------- live-bytes counter
class LiveBytes(TorchDispatchMode):
    """Bytes of live storages on one device type, current and peak, counted at every ATen op.

    A storage is counted once (views share it) when an op first returns a tensor on it, or when :meth:`track`
    registers it (weights created before the mode), and uncounted when its Python storage object is collected
    (PyTorch keeps one Python object per storage, alive exactly as long as the storage). Works alike on real
    and on fake tensors, so the same counter is validated on a real CPU run (``tests/benchmarks``).

    Args:
        device_type: storages on this device type are counted ("cuda" in the simulation, "cpu" in the check).
        fake_scalars: answer ``aten._local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``) with True / 1
            instead of running it — fake tensors have no values.
    """

    def __init__(self, device_type: str = "cuda", *, fake_scalars: bool = False) -> None:
        super().__init__()
        self.device_type = device_type
        self.fake_scalars = fake_scalars
        self.current = 0
        self.peak = 0
        self._live: WeakIdKeyDictionary = WeakIdKeyDictionary()

    def track(self, *tensors: Any) -> None:
        """Count the storages of ``tensors`` (any nesting of lists/tuples/dicts of tensors) if not yet counted."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == self.device_type:
                st = t.untyped_storage()
                if st in self._live:
                    continue
                n = st.nbytes()
                self._live[st] = n
                self.current += n
                weakref.finalize(st, self._free, n)
        self.peak = max(self.peak, self.current)

    def _free(self, n: int) -> None:
        self.current -= n

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.fake_scalars and func is aten._local_scalar_dense.default:
            t = args[0]
            if not isinstance(t, FakeTensor):  # a real tensor (token ids, a step counter): its value
                with unset_fake_temporarily():
                    return func(*args)
            return True if t.dtype == torch.bool else 1 if not t.is_floating_point() else 1.0
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out


# ---------------------------------------------------------------------------------------------- CUDA pretence
class _FlashSDPA(torch.autograd.Function):
    """``F.scaled_dot_product_attention`` as an H100 runs it for fp16/bf16, head size ≤ 256: the flash kernel
    (output and a (B, heads, q) fp32 log-sum-exp saved; no (q, k) matrix)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse, cq, ck, mq, mk, seed, offset, _ = aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.extra = (cq, ck, mq, mk, seed, offset, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse = ctx.saved_tensors
        cq, ck, mq, mk, seed, offset, scale = ctx.extra
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cq, ck, mq, mk, 0.0, False, seed, offset, scale=scale
        )
        return dq, dk, dv, None


_sdpa = F.scaled_dot_product_attention


def _flash_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
    if attn_mask is not None or is_causal or dropout_p or kwargs:  # the text encoders' masked attention (77 tokens)
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else query.dtype
    q, k, v = (x.to(dtype) for x in (query, key, value))
    return _FlashSDPA.apply(q, k, v, scale)


# Functions CUDA autocast runs in float32 (torch/testing/_internal/autocast_test_lists.py, those these models call);
# CPU autocast leaves them in the input's dtype.
_CUDA_FP32 = {
    F.group_norm, F.layer_norm, F.softmax, F.log_softmax, F.mse_loss, torch.softmax, torch.log_softmax,
    torch.Tensor.softmax, torch.Tensor.log_softmax, torch.exp, torch.Tensor.exp, torch.log, torch.Tensor.log,
    torch.pow, torch.Tensor.pow, torch.Tensor.__pow__, torch.rsqrt, torch.Tensor.rsqrt, torch.logsumexp,
    torch.Tensor.logsumexp, torch.cumsum, torch.Tensor.cumsum, torch.norm, torch.Tensor.norm,
}
if hasattr(F, "rms_norm"):
    _CUDA_FP32.add(F.rms_norm)


_FROM_DATA = {torch.tensor, torch.as_tensor}


def _real_integers(args, kwargs) -> bool:
    """True when the call's tensors are all real integer or bool tensors (token ids and what derives from them)."""
    tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    return bool(tensors) and all(
        not isinstance(t, FakeTensor) and not t.is_floating_point() and not t.is_complex() for t in tensors
    )


_FACTORIES = {torch.arange, torch.eye, torch.zeros, torch.ones, torch.full, torch.empty}


def _integer_factory(func, args, kwargs) -> bool:
    """An integer or bool tensor made from sizes alone (``torch.arange(k)``, ``torch.eye(m, dtype=bool)``)."""
    if func not in _FACTORIES or any(isinstance(x, torch.Tensor) for x in tree_flatten((args, kwargs))[0]):
        return False
    dtype = kwargs.get("dtype")
    if dtype is None:
        return func is torch.arange and all(isinstance(a, int) for a in args)
    return not (dtype.is_floating_point or dtype.is_complex)


class SimulationFunctions(TorchFunctionMode):
    """While CPU autocast is on, run CUDA autocast's float32 functions in float32 (inputs cast up, output float32).

    Above autograd (a function mode), so the casts are part of the graph as CUDA autocast's are. The half-precision
    lists of CPU and CUDA autocast agree on what these models call (linear, matmul, bmm, baddbmm, conv, SDPA).
    Also keeps tensors made from Python data (``torch.tensor``: token ids, positions) and integer results computed
    from real integer tensors real, so that code reading them back (``.tolist()``) sees their values.
    """

    def __init__(self, cuda_autocast: bool = True) -> None:
        super().__init__()
        self.cuda_autocast = cuda_autocast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FROM_DATA or _real_integers(args, kwargs) or _integer_factory(func, args, kwargs):
            with unset_fake_temporarily():
                return func(*args, **kwargs)
        if self.cuda_autocast and func in _CUDA_FP32 and torch.is_autocast_enabled("cpu"):
            def up(x):
                return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

            args = tuple(up(a) for a in args)
            kwargs = {k: up(v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _fp32_under_autocast(fn):
    def wrapper(*args, **kwargs):
        if torch.is_autocast_enabled("cpu"):
            def up(x):
                return x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x

            args = tuple(up(a) for a in args)
            kwargs = {k: up(v) for k, v in kwargs.items()}
        return fn(*args, **kwargs)

    return wrapper


# Patched as attributes too: gradient checkpointing recomputes blocks inside backward, where the function mode
# is not active; the norms and softmax must be recomputed in float32 as they were computed in the forward.
_PATCHED_FP32 = [(F, "group_norm"), (F, "layer_norm"), (F, "softmax"), (torch.Tensor, "softmax")]


@contextlib.contextmanager
def simulation(cuda_like: bool = True) -> Iterator[tuple[FakeTensorMode, LiveBytes]]:
    """Fake tensors and a live-bytes counter (enter it innermost: ``with live:``); ``cuda_like``: with CUDA's
    autocast casts and flash attention (module docstring, 1 and 3), else the CPU's own behaviour (the check
    against a real CPU run)."""
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    live = LiveBytes(DEVICE.type, fake_scalars=True)
    with contextlib.ExitStack() as stack:
        if cuda_like:
            stack.enter_context(mock.patch.object(F, "scaled_dot_product_attention", _flash_sdpa))
            for owner, name in _PATCHED_FP32:
                stack.enter_context(mock.patch.object(owner, name, _fp32_under_autocast(getattr(owner, name))))
        stack.enter_context(SimulationFunctions(cuda_autocast=cuda_like))
        stack.enter_context(fake)
        yield fake, live


# ---------------------------------------------------------------------------------------------- architectures
def sdxl_unet_config() -> dict:
    """UNet2DConditionModel config of SDXL base 1.0 (DESIGN §9; 2.57 B parameters).

    TODO: use ``conceptexpress.testing.sdxl_unet_config`` once it lands on main.
    """
    return dict(
        sample_size=128,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
        use_linear_projection=True,
        norm_num_groups=32,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def _vae(scaling_factor: float, force_upcast: bool):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
        latent_channels=4, norm_num_groups=32, sample_size=1024 if force_upcast else 512,
        scaling_factor=scaling_factor, force_upcast=force_upcast,
    )


def _clip(hidden: int, layers: int, heads: int, inter: int, proj: int, *, with_projection: bool, act: str):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    # bos/eos: the special-token ids of conceptexpress.testing's generated tokenizer (vocabulary stays 49408).
    return cls(CLIPTextConfig(
        vocab_size=49408, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=77, projection_dim=proj, hidden_act=act,
        bos_token_id=512, eos_token_id=513, pad_token_id=1,
    ))


def build_pipeline(model: str, tok_dir: Path, weights: torch.dtype = torch.float16):
    """The full-size ``sd21`` or ``sdxl`` pipeline on the meta device (no memory, seconds), frozen and in eval mode.

    :func:`to_fake_device` then gives it fake weights on the pretended CUDA device.
    """
    with torch.device("meta"):
        pipe = _build_pipeline(model, tok_dir, weights)
    if model == "sdxl":  # a scheduler's tables are real data, built off the meta device
        from diffusers import EulerDiscreteScheduler

        pipe.scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
        )
    pipe.set_progress_bar_config(disable=True)
    for m in pipeline_modules(pipe):
        m.requires_grad_(False)
        m.eval()
    return pipe


def pipeline_modules(pipe) -> list[torch.nn.Module]:
    return [m for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if m is not None]


def to_fake_device(modules, device: torch.device = DEVICE) -> None:
    """Replace every parameter and buffer of ``modules`` by an uninitialized tensor of the same shape and dtype on
    ``device``; call under the fake mode. (``Module.to`` cannot move fake parameters: it swaps them in place,
    which the fake mode's weak references forbid.)"""
    for module in modules:
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None:
                    sub._parameters[name] = torch.nn.Parameter(
                        torch.empty(p.shape, dtype=p.dtype, device=device), requires_grad=p.requires_grad
                    )
            for name, b in list(sub._buffers.items()):
                if b is not None:
                    sub._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


def _build_pipeline(model: str, tok_dir: Path, weights: torch.dtype):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from conceptexpress.testing import _pipeline, _sd21_modules, write_clip_tokenizer

    if model == "sd21":
        unet, vae, text_encoder = _sd21_modules(0, weights)
        return _pipeline(unet, vae, text_encoder, write_clip_tokenizer(tok_dir / "sd2", pad_style="sd2"))
    unet = UNet2DConditionModel(**sdxl_unet_config()).to(weights)
    vae = _vae(0.13025, force_upcast=True).float()  # fp32: SDXL's VAE overflows in fp16
    te1 = _clip(768, 12, 12, 3072, 768, with_projection=False, act="quick_gelu").to(weights)
    te2 = _clip(1280, 32, 20, 5120, 1280, with_projection=True, act="gelu").to(weights)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2,
        tokenizer=CLIPTokenizer.from_pretrained(write_clip_tokenizer(tok_dir / "l", pad_style="sd1")),
        tokenizer_2=CLIPTokenizer.from_pretrained(write_clip_tokenizer(tok_dir / "g", pad_style="sd2")),
        unet=unet,
        scheduler=None,
    )
    return pipe


def resolution_of(model: str) -> int:
    return 512 if model == "sd21" else 1024


# ---------------------------------------------------------------------------------------------- the measured code
def _localizer_cls():
    try:  # a parallel refactor may move it
        from conceptexpress.attention.localizer import ConceptLocalizer
    except ImportError:
        from conceptexpress.localizer import ConceptLocalizer
    return ConceptLocalizer


def photo(resolution: int):
    from PIL import Image

    return Image.new("RGB", (resolution, resolution), (120, 90, 60))


def localize_pass(pipe, resolution: int) -> str:
    """``ConceptLocalizer.attention`` on a photo at the model's native size; returns the stage name."""
    return _localizer_cls()(pipe).attention(photo(resolution)) and "localize"


def localize_proxy(pipe, resolution: int) -> str:
    """SDXL localization as DESIGN §9 describes it, with the package's pieces (until the localizer takes SDXL):
    VAE encode (fp32), both encoders on "", one UNet pass capturing every self-attention layer into a 64×64
    accumulator (the finest grid) and the [EOT] cross-attention at latent/4."""
    from conceptexpress.attention.aggregate import CrossAttentionAccumulator, SelfAttentionAccumulator
    from conceptexpress.attention.capture import capture_attention
    from conceptexpress.io.images import image_to_tensor
    from conceptexpress.models.family import SDXL

    with torch.no_grad():
        pixels = image_to_tensor(photo(resolution), (resolution, resolution)).to(DEVICE, pipe.vae.dtype)
        latent = (pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor).to(pipe.unet.dtype)
        hw = (latent.shape[-2], latent.shape[-1])
        ids = SDXL.tokenize(pipe, [""])
        cond = SDXL.encode(pipe, ids, time_ids=SDXL.micro_conditioning((resolution,) * 2, (resolution,) * 2))
        eot = 1  # "" tokenizes to [BOS, EOT, pad, ...] in both tokenizers
        self_acc = SelfAttentionAccumulator((hw[0] // 2, hw[1] // 2))
        cross_acc = CrossAttentionAccumulator(hw, [eot])
        t = torch.zeros(1, dtype=torch.long, device=DEVICE)
        with capture_attention(pipe.unet, hw, self_attention=self_acc, cross_attention=cross_acc):
            pipe.unet(latent, t, **SDXL.unet_kwargs(cond))
        self_acc.result()[0].float().cpu()
        cross_acc.result()[0, 0].float().cpu()
    return "localize_proxy"


def concept_layout(latent: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rectangular concepts on a (latent, latent) grid: masks (3, h, w) bool, centroids (3, h·w) float32."""
    masks = torch.zeros(CONCEPTS, latent, latent, dtype=torch.bool)
    q = latent // 8
    for i, (y, x) in enumerate([(1, 1), (1, 5), (5, 3)]):
        masks[i, y * q : (y + 2) * q, x * q : (x + 2) * q] = True
    centroids = masks.flatten(1).float()
    return masks, centroids / centroids.sum(1, keepdim=True)


@contextlib.contextmanager
def trainer_patches() -> Iterator[None]:
    """The two data-dependent helpers of the trainer's constructor (module docstring, 5)."""
    from conceptexpress.learn.trainer import TokenTrainer

    def zeros(self, base, tok):
        return torch.zeros(self.n * self.g, base.embedding_dim, dtype=torch.float32)

    with mock.patch.object(TokenTrainer, "_initial_vectors", zeros), \
            mock.patch.object(TokenTrainer, "_make_fingerprint", lambda self, image: "simulated"):
        yield


def _sdxl_proxy_trainer():
    """``TokenTrainer`` with SDXL's conditioning in its ``_denoise`` seam (module docstring, 8): both encoders
    spliced (a 768-d and a 1280-d vector per token, per-prompt copies with gradient), context through
    ``ModelFamily.encode`` (penultimate states, pooled end-of-text embedding of encoder 2), time ids of the photo."""
    from conceptexpress.learn.tokens import spliced_tokens
    from conceptexpress.learn.trainer import TokenTrainer
    from conceptexpress.models.family import SDXL

    class SDXLProxyTrainer(TokenTrainer):
        def train(self, *args, **kwargs):
            d2 = self.pipe.text_encoder_2.get_input_embeddings().embedding_dim
            self.vectors_2 = torch.nn.Parameter(torch.zeros(self.vectors.shape[0], d2, device=self.device))
            w, h = self.work_size
            self.time_ids = SDXL.micro_conditioning((h, w), (h, w))
            with spliced_tokens(self.pipe.text_encoder_2, self.vectors_2) as wrapper_2:
                self._wrapper_2 = wrapper_2
                return super().train(*args, **kwargs)

        def _denoise(self, input_ids, latents, noise, timesteps):
            unet = self.pipe.unet
            leaf_2 = self.vectors_2.detach().unsqueeze(0).repeat(input_ids.shape[0], 1, 1).requires_grad_(True)
            self._wrapper_2.batch_vectors = leaf_2  # (b, K, 1280)
            # Both generated tokenizers give the same ids (they differ in padding only): one id tensor serves both.
            cond = SDXL.encode(self.pipe, [input_ids, input_ids], time_ids=self.time_ids)
            # ModelFamily.encode returns the pooled embedding and time ids in the UNet's dtype (fp16 here); under
            # bf16 autocast the UNet's torch.concat of fp16 text_embeds with its fp32 time embedding raises
            # "Unexpected floating ScalarType in at::autocast::prioritize" (on CUDA as on CPU): pass them in fp32.
            cond = dataclasses.replace(cond, pooled=cond.pooled.float(), time_ids=cond.time_ids.float())
            noisy = self.scheduler.add_noise(latents, noise, timesteps).to(unet.dtype)
            pred = unet(noisy, timesteps, **SDXL.unet_kwargs(cond)).sample  # (b, 4, h, w)
            return pred, noise

    return SDXLProxyTrainer


def run_train_step(pipe, resolution: int, runtime, *, merged: bool, live: LiveBytes, trainer_cls=None) -> dict:
    """One step of ``TokenTrainer.train`` (split phase, or the first merged step): peaks and FLOPs."""
    from conceptexpress.config import TrainConfig

    masks, centroids = concept_layout(resolution // 8)
    # emd_method "sinkhorn": what "auto" picks on CUDA (the simulated device is a CPU one).
    config = TrainConfig(steps=TrainConfig().merge_step + 1 if merged else 1, emd_method="sinkhorn")
    return measure_train_step(pipe, photo(resolution), (resolution, resolution), masks, centroids, config,
                              runtime, live=live, merged=merged, trainer_cls=trainer_cls)


def measure_train_step(pipe, image, work_size, masks, centroids, config, runtime, *, live: LiveBytes,
                       merged: bool = False, trainer_cls=None) -> dict:
    """Build a trainer and run ``train()`` for the last step of ``config`` (the first merged step when ``merged``):
    ``{init_peak_gb, step_peak_gb, flops, prompts}``. Real or fake tensors alike."""
    from conceptexpress.learn.trainer import TokenTrainer

    trainer_cls = trainer_cls or TokenTrainer
    live.reset_peak()
    with trainer_patches(), live:
        trainer = trainer_cls(pipe, image, work_size, masks, centroids, config, runtime=runtime)
    init_peak = live.peak
    live.reset_peak()
    if merged:
        trainer.step = config.merge_step
    with FlopCounterMode(display=False) as flops, live:
        trainer.train()
    out = {"init_peak_gb": init_peak / GIB, "step_peak_gb": live.peak / GIB, "flops": flops.get_total_flops(),
           "prompts": trainer.history[-1]["prompts"]}
    del trainer
    return out


def unet_forward_flops(pipe, resolution: int) -> int:
    """FLOPs of one plain UNet forward of one sample at ``resolution`` (DESIGN §9's reference figures)."""
    from conceptexpress.models.family import family_of

    h = resolution // 8
    unet = pipe.unet
    kwargs: dict[str, Any] = {"encoder_hidden_states": torch.zeros(1, 77, unet.config.cross_attention_dim, dtype=unet.dtype)}
    if family_of(pipe).time_ids:
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, 1280, dtype=unet.dtype),
                                       "time_ids": torch.zeros(1, 6, dtype=unet.dtype)}
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        unet(torch.zeros(1, 4, h, h, dtype=unet.dtype), torch.zeros(1, dtype=torch.long), **kwargs)
    return flops.get_total_flops()


def run_localize(pipe, resolution: int, live: LiveBytes, proxy: bool) -> dict:
    live.reset_peak()
    with FlopCounterMode(display=False) as flops, live:
        stage = (localize_proxy if proxy else localize_pass)(pipe, resolution)
    return {"stage": stage, "peak_gb": live.peak / GIB, "flops": flops.get_total_flops()}


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def simulate(model: str, precisions, micro_batches, checkpointing, log=print, weights: str = "fp16") -> list[dict]:
    """All rows of one model: the localization pass, then train steps over the grid."""
    import gc

    from conceptexpress.config import RuntimeConfig

    resolution = resolution_of(model)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(model, Path(tmp), torch.float16 if weights == "fp16" else torch.bfloat16)
    with simulation() as (_, live):
        modules = pipeline_modules(pipe)
        to_fake_device(modules)
        live.track([list(m.parameters()) + list(m.buffers()) for m in modules])
        weights_gb = live.current / GIB
        base = {"model": model, "resolution": resolution, "weights": weights, "weights_gb": _r(weights_gb)}
        fwd = unet_forward_flops(pipe, resolution)
        row = {**base, "stage": "unet_forward", "precision": f"{weights} weights", "micro_batch": 1, "checkpointing": None,
               "peak_gb": None, "tflop_per_step": _r(fwd / 1e12), "est_h100_s_per_image": None,
               "design_tflop": {"sd21": 0.80, "sdxl": 6.76}[model]}
        rows.append(row)
        log(json.dumps(row))

        # 1. Localization (one pass per image; independent of the training settings).
        proxy_reason = None
        try:
            loc = run_localize(pipe, resolution, live, proxy=False)
        except Exception as e:  # noqa: BLE001 - an SDXL pipeline the localizer does not take yet
            if model == "sd21":
                raise
            proxy_reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
            gc.collect()
            loc = run_localize(pipe, resolution, live, proxy=True)
        loc_flops = loc["flops"]
        row = {**base, "stage": loc["stage"], "precision": f"{weights} weights", "micro_batch": None,
               "checkpointing": None, "peak_gb": _r(loc["peak_gb"]), "tflop_per_step": _r(loc_flops / 1e12),
               "est_h100_s_per_image": _r(loc_flops / (UTILIZATION * H100_BF16_DENSE))}
        if proxy_reason:
            row["proxy_reason"] = proxy_reason
        rows.append(row)
        log(json.dumps(row))

        # 2. Token learning: split-phase step for every setting; merged-phase FLOPs once per checkpointing mode.
        trainer_cls, proxy_reason, merged_flops = None, None, {}
        for ckpt in checkpointing:
            for precision in precisions:
                for micro in micro_batches:
                    runtime = RuntimeConfig(micro_batch=micro, gradient_checkpointing=ckpt,
                                            mixed_precision=precision, checkpoint_every=0)
                    t0 = time.perf_counter()
                    try:
                        split = run_train_step(pipe, resolution, runtime, merged=False, live=live,
                                               trainer_cls=trainer_cls)
                    except Exception as e:  # noqa: BLE001 - the trainer does not take SDXL yet
                        if model == "sd21" or trainer_cls is not None:
                            raise
                        proxy_reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                        trainer_cls = _sdxl_proxy_trainer()
                        gc.collect()
                        split = run_train_step(pipe, resolution, runtime, merged=False, live=live,
                                               trainer_cls=trainer_cls)
                    if ckpt not in merged_flops:
                        merged_flops[ckpt] = run_train_step(
                            pipe, resolution, runtime, merged=True, live=live, trainer_cls=trainer_cls
                        )["flops"]
                    total = SPLIT_STEPS * split["flops"] + MERGED_STEPS * merged_flops[ckpt] + loc_flops
                    row = {
                        **base,
                        "stage": "unet_step_proxy" if trainer_cls is not None else "train_step",
                        "precision": precision,
                        "micro_batch": micro,
                        "checkpointing": ckpt,
                        "peak_gb": _r(max(split["init_peak_gb"], split["step_peak_gb"])),
                        "tflop_per_step": _r(split["flops"] / 1e12, 2),
                        "est_h100_s_per_image": _r(total / (UTILIZATION * H100_BF16_DENSE), 1),
                        "step_peak_gb": _r(split["step_peak_gb"]),
                        "init_peak_gb": _r(split["init_peak_gb"]),
                        "tflop_merged_step": _r(merged_flops[ckpt] / 1e12, 2),
                        "pflop_per_image": _r(total / 1e15, 2),
                        "prompts_per_split_step": split["prompts"],
                        "sim_s": _r(time.perf_counter() - t0, 1),
                    }
                    if proxy_reason:
                        row["proxy_reason"] = proxy_reason
                    rows.append(row)
                    log(json.dumps(row))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["sd21", "sdxl"], choices=["sd21", "sdxl"])
    parser.add_argument("--precisions", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16"])
    parser.add_argument("--micro-batches", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--weights", default="fp16", choices=["fp16", "bf16"],
                        help="dtype of UNet and text encoders (the SDXL VAE stays fp32); default fp16 = --dtype fp16")
    args = parser.parse_args(argv)
    ckpt = [c == "on" for c in args.checkpointing]
    for model in args.models:
        simulate(model, args.precisions, args.micro_batches, ckpt, log=lambda line: print(line, flush=True),
                 weights=args.weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
