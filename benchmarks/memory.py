"""GPU memory and FLOPs of token learning and localization, simulated on the CPU with fake tensors (issue 27, item 7).

Runs the package's real code — one ``TokenTrainer.train_step()`` (through ``TokenTrainer.train`` with one step)
and one ``ConceptLocalizer.attention`` pass — on the full-size architectures (SD 2.1-base at 512 px, SDXL base at
1024 px, both from ``conceptexpress.testing``'s builders on the meta device) under
``torch._subclasses.fake_tensor.FakeTensorMode``: every tensor has its real shape, dtype and device but no storage,
so nothing is computed and a 2.6 B-parameter UNet costs no memory. Two dispatch modes watch every ATen op:
:class:`FlopCounter` (``torch.utils.flop_counter.FlopCounterMode`` without its per-module tracking, 9) counts
FLOPs, :class:`LiveBytes` counts the bytes of the live device storages (each storage once, freed when its last
tensor dies) and keeps the peak. Prints one JSON row per setting::

    {model, resolution, weights, stage, precision, micro_batch, checkpointing, peak_gb, tflop_per_step,
     est_h100_s_per_image, ...}

``peak_gb`` is GiB (2**30 bytes) of live tensors: what ``torch.cuda.max_memory_allocated`` would report. A card
needs more: the CUDA context and cuBLAS/cuDNN workspaces (~0.5–1 GiB) and the caching allocator's fragmentation
(typically 5–15 %) come on top.

Assumptions (each chosen to be what the real code would allocate on a CUDA GPU):

1. **The device is CUDA.** Tensors are fake ``cuda:0`` tensors; ``torch.autocast("cuda")`` and
   ``torch.amp.GradScaler("cuda")`` are enabled although this torch build has no CUDA (their availability checks
   are patched), so CUDA autocast's op lists apply (e.g. group/layer norm outputs in fp32) and the trainer takes
   its CUDA branches (batched Sinkhorn EMD instead of POT's exact EMD; fp16 loss scaling).
2. **Weights as** ``load_pipeline(..., dtype=--weights)`` **leaves them** (default fp16 = ``--dtype fp16``): UNet,
   text encoder(s) and VAE in that dtype, except an fp16 SDXL's VAE, kept in fp32 (``keep_vae_fp32``: it
   overflows in fp16). Autocast (``precision``) in another dtype than the weights (bf16 autocast on fp16 weights)
   casts each weight per call, as it would on a GPU, and the cast copies are saved for the backward. Token
   vectors and their AdamW state are fp32.
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
   vocabulary rows with ``nonzero``, whose output shape depends on data) returns fp32 zeros of the same shape
   (g·N, ΣD: SDXL's 768 + 1280), and
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
8. **Concepts on the localizer's grid**: three rectangles on ``family.clustering_grid`` (SD 2.1: the 64×64
   latent; SDXL: 64×64 = latent/2, which the trainer up-samples to the 128×128 latent), as ``extract`` passes them.
9. **FLOPs without module tracking.** ``FlopCounterMode`` attributes FLOPs to modules with a ``ModuleTracker``
   that hooks every module's input and output tensors and keeps the handles; under gradient checkpointing the
   recomputed forward's tensors got such hooks too and stayed alive until the step ended, so a checkpointed step
   read a higher peak than an unchecked one (SD 2.1 @ 512, fp16, micro-batch 4: 9.35 vs 6.19 GiB). A real GPU
   run has no such tracker. :class:`FlopCounter` counts the same totals without it (checked in
   ``tests/benchmarks/test_memory_counter.py``, which also checks the checkpointed peak on fake vs real tensors).

    PYTHONPATH=src python benchmarks/memory.py                  # both models, the full grid (about an hour on 2 cores)
    PYTHONPATH=src python benchmarks/memory.py --models sd21 --precisions bf16 --micro-batches 4 --weights bf16
    PYTHONPATH=src python benchmarks/memory.py --models sdxl --no-localize --merged-tflop 59.5 80.35  # reuse FLOPs
"""

from __future__ import annotations

import argparse
import contextlib
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


class _NoModuleTracking:
    parents = ("Global",)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return None


class FlopCounter(FlopCounterMode):
    """``torch.utils.flop_counter.FlopCounterMode`` (same registry, same dispatch and decomposition rules) without
    its per-module attribution, which would distort :class:`LiveBytes`' peak under gradient checkpointing.

    FlopCounterMode's ``ModuleTracker`` registers a multi-grad hook on the tensors entering and leaving every
    module and keeps the handles until it exits. Under ``torch.utils.checkpoint`` the checkpointed blocks run a
    second time inside the backward; those recomputed tensors get hooks too, hooks that never fire, and the
    handles hold the recomputed activations until the step ends — on the tiny pipeline the checkpointed step
    then peaked at 22.5 MB instead of 10.9 MB (without checkpointing 16.7 MB either way;
    ``tests/benchmarks/test_memory_counter.py``). Totals only: ``get_total_flops()``.
    """

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _NoModuleTracking()


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
def build_pipeline(model: str, tok_dir: Path, weights: torch.dtype = torch.float16):
    """The full-size ``sd21`` or ``sdxl`` pipeline on the meta device (no memory, seconds), frozen and in eval mode,
    with ``weights`` as ``load_pipeline(..., dtype=weights)`` leaves them (an fp16 SDXL keeps its VAE in fp32).

    :func:`to_fake_device` then gives it fake weights on the pretended CUDA device.
    """
    from conceptexpress.models.loading import frozen_pipeline, keep_vae_fp32
    from conceptexpress.testing import _pipeline, _sd21_modules, sdxl_random_pipeline, write_clip_tokenizer

    if model == "sd21":
        with torch.device("meta"):
            modules = _sd21_modules(0, weights)
        return frozen_pipeline(_pipeline(*modules, write_clip_tokenizer(tok_dir / "sd2", pad_style="sd2")), "meta")
    pipe = sdxl_random_pipeline(tok_dir / "sdxl", device="meta", dtype=weights)
    if weights == torch.float16:  # load_pipeline's rule: SDXL's VAE overflows in fp16
        keep_vae_fp32(pipe.vae)
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

    def zeros(self, bases, toks):
        return torch.zeros(self.n * self.g, sum(b.embedding_dim for b in bases), dtype=torch.float32)

    with mock.patch.object(TokenTrainer, "_initial_vectors", zeros), \
            mock.patch.object(TokenTrainer, "_make_fingerprint", lambda self, image: "simulated"):
        yield


def run_train_step(pipe, resolution: int, runtime, *, merged: bool, live: LiveBytes) -> dict:
    """One step of ``TokenTrainer.train`` (split phase, or the first merged step): peaks and FLOPs."""
    from conceptexpress.config import TrainConfig
    from conceptexpress.models.family import family_of

    latent = resolution // 8
    grid = family_of(pipe).clustering_grid(pipe, (latent, latent))  # the localizer's grid (SDXL: latent/2)
    masks, centroids = concept_layout(grid[0])
    # emd_method "sinkhorn": what "auto" picks on CUDA (the simulated device is a CPU one).
    config = TrainConfig(steps=TrainConfig().merge_step + 1 if merged else 1, emd_method="sinkhorn")
    return measure_train_step(pipe, photo(resolution), (resolution, resolution), masks, centroids, config,
                              runtime, live=live, merged=merged)


def measure_train_step(pipe, image, work_size, masks, centroids, config, runtime, *, live: LiveBytes,
                       merged: bool = False, flop_counter=FlopCounter) -> dict:
    """Build a trainer and run ``train()`` for the last step of ``config`` (the first merged step when ``merged``):
    ``{init_peak_gb, step_peak_gb, flops, prompts}``. Real or fake tensors alike."""
    from conceptexpress.learn.trainer import TokenTrainer

    live.reset_peak()
    with trainer_patches(), live:
        trainer = TokenTrainer(pipe, image, work_size, masks, centroids, config, runtime=runtime)
    init_peak = live.peak
    live.reset_peak()
    if merged:
        trainer.step = config.merge_step
    with flop_counter() as flops, live:
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


def run_localize(pipe, resolution: int, live: LiveBytes) -> dict:
    live.reset_peak()
    with FlopCounter() as flops, live:
        stage = localize_pass(pipe, resolution)
    return {"stage": stage, "peak_gb": live.peak / GIB, "flops": flops.get_total_flops()}


def _r(x: float, nd: int = 3) -> float:
    return round(float(x), nd)


def simulate(model: str, precisions, micro_batches, checkpointing, log=print, weights: str = "fp16",
             localize: bool = True, merged_tflop: dict | None = None) -> list[dict]:
    """All rows of one model: the localization pass, then train steps over the grid.

    ``merged_tflop`` ({checkpointing: TFLOP of a merged step}, from an earlier run's rows) skips simulating the
    merged step, whose FLOPs depend neither on the precision nor on the micro-batch.
    """
    from conceptexpress.config import RuntimeConfig

    resolution = resolution_of(model)
    rows: list[dict] = []
    wdtype = torch.float16 if weights == "fp16" else torch.bfloat16
    with tempfile.TemporaryDirectory() as tmp:
        pipe = build_pipeline(model, Path(tmp), wdtype)
    with simulation() as (_, live):
        modules = pipeline_modules(pipe)
        to_fake_device(modules)
        live.track([list(m.parameters()) + list(m.buffers()) for m in modules])
        weights_gb = live.current / GIB
        base = {"model": model, "resolution": resolution, "weights": weights, "weights_gb": _r(weights_gb),
                "simulated": True}

        # 1. Localization (one pass per image; independent of the training settings).
        loc_flops = None
        if localize:
            fwd = unet_forward_flops(pipe, resolution)
            row = {**base, "stage": "unet_forward", "precision": weights, "micro_batch": 1,
                   "checkpointing": None, "peak_gb": None, "tflop_per_step": _r(fwd / 1e12),
                   "est_h100_s_per_image": None, "design_tflop": {"sd21": 0.80, "sdxl": 6.76}[model]}
            rows.append(row)
            log(json.dumps(row))
            t0 = time.perf_counter()
            loc = run_localize(pipe, resolution, live)
            loc_flops = loc["flops"]
            row = {**base, "stage": loc["stage"], "precision": weights, "micro_batch": 1,
                   "checkpointing": None, "peak_gb": _r(loc["peak_gb"]), "tflop_per_step": _r(loc_flops / 1e12),
                   "est_h100_s_per_image": _r(loc_flops / (UTILIZATION * H100_BF16_DENSE)),
                   "sim_s": _r(time.perf_counter() - t0, 1)}
            rows.append(row)
            log(json.dumps(row))

        # 2. Token learning: split-phase step for every setting; merged-phase FLOPs once per checkpointing mode.
        merged_flops = {k: v * 1e12 for k, v in (merged_tflop or {}).items()}
        for ckpt in checkpointing:
            for precision in precisions:
                for micro in micro_batches:
                    runtime = RuntimeConfig(micro_batch=micro, gradient_checkpointing=ckpt,
                                            mixed_precision=precision, checkpoint_every=0)
                    t0 = time.perf_counter()
                    split = run_train_step(pipe, resolution, runtime, merged=False, live=live)
                    if ckpt not in merged_flops:
                        merged_flops[ckpt] = run_train_step(pipe, resolution, runtime, merged=True, live=live)["flops"]
                    total = SPLIT_STEPS * split["flops"] + MERGED_STEPS * merged_flops[ckpt] + (loc_flops or 0)
                    row = {
                        **base,
                        "stage": "train_step",
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
                        "localization_in_estimate": loc_flops is not None,
                        "prompts_per_split_step": split["prompts"],
                        "sim_s": _r(time.perf_counter() - t0, 1),
                    }
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
                        help="dtype of the weights as load_pipeline(dtype=...) leaves them (an fp16 SDXL keeps its VAE "
                             "in fp32); default fp16 = --dtype fp16")
    parser.add_argument("--no-localize", action="store_true",
                        help="skip the localization pass (and leave it out of est_h100_s_per_image)")
    parser.add_argument("--merged-tflop", nargs=2, type=float, metavar=("OFF", "ON"),
                        help="TFLOP of a merged step without / with checkpointing, from an earlier run's "
                             "tflop_merged_step (skips simulating it: it depends on neither precision nor micro-batch)")
    args = parser.parse_args(argv)
    ckpt = [c == "on" for c in args.checkpointing]
    merged = dict(zip((False, True), args.merged_tflop)) if args.merged_tflop else None
    for model in args.models:
        simulate(model, args.precisions, args.micro_batches, ckpt, log=lambda line: print(line, flush=True),
                 weights=args.weights, localize=not args.no_localize, merged_tflop=merged)
    return 0


if __name__ == "__main__":
    sys.exit(main())
