"""Concept-wise masked denoising with split-and-merge (paper §3.3–3.4, Eq. 7–13; docs/fidelity.md).

One training step, in order:

1. choose the prompt set of the phase — split: "a photo of [V_i^j]" for every concept i and split token j;
   merged: "a photo of [V_i]" for every concept plus the joint "a photo of [V_1] and … and [V_N]";
2. flip image, masks and centroids together with p = 0.5; draw a latent from the cached VAE posterior, noise
   and t ~ U[0, T) for every prompt (one CPU generator: the same seed gives the same run on any device);
3. push all prompts through the UNet in micro-batches, capturing the learnable tokens' cross-attention at
   latent/4 only (SDPA elsewhere), and back-propagate masked ε-MSE (Eq. 8) + β·EMD (Eq. 11) of each prompt
   into a per-prompt copy of the token vectors;
4. add α·contrastive (Eq. 10) in the split phase and replay one AdamW step per prompt from the per-prompt
   gradients (``update_rule="released"``, the default: the authors' dynamics, 100·g·N + 400·(N+1) optimizer
   steps from a single batched pass per step), or take one AdamW step on the mean (Eq. 12/13 read literally,
   ``update_rule="batched"``). Each step's token gradient is clipped to ``max_grad_norm`` (1.0, as released).

Precision: the token vectors (and their AdamW state) are fp32 master weights whatever the model's dtype. On CUDA the
text encoder and UNet run under bf16 autocast where the GPU supports it, else fp16 autocast with dynamic loss
scaling (``torch.amp.GradScaler``): dL/d(UNet output) is ~2e-6 at 512 px, below fp16's smallest normal number, so
unscaled fp16 token gradients flush to zero. A step whose scaled gradient overflows is skipped and logged.

At ``merge_step`` each concept's g vectors are averaged into its first row (the released code's layout, so the
AdamW moments of that row carry over). Only the new vectors train; the model's weights never change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image, ImageDraw

from ..attention.aggregate import CrossAttentionAccumulator
from ..attention.capture import capture_attention
from ..config import RuntimeConfig, TrainConfig
from ..errors import ConfigError
from ..io.images import image_to_tensor
from ..models.family import family_of
from . import losses
from .checkpoint import TrainState, load_checkpoint, save_checkpoint
from .tokens import (
    Prompt,
    PromptBuilder,
    init_from_vocabulary,
    init_from_words,
    spliced_tokens,
    word_token_ids,
)

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

logger = logging.getLogger(__name__)

StepCallback = Callable[["TokenTrainer", dict[str, Any]], None]


@dataclass(frozen=True)
class TrainResult:
    """Learned embeddings ``(N, D)`` float32 (row i = token of concept i), loss history and cost."""

    embeddings: torch.Tensor
    history: list[dict[str, Any]]
    sample_passes: int
    optimizer_steps: int
    steps: int
    skipped_steps: int = 0  # fp16 steps whose scaled gradient overflowed (no optimizer step taken)


def released_sample_passes(num_concepts: int, config: TrainConfig) -> int:
    """UNet sample-passes of the authors' code for the same schedule: 2·(merge·gN + rest·(N+1))."""
    g, n = config.tokens_per_concept, num_concepts
    merge = min(config.merge_step, config.steps)
    return 2 * (merge * g * n + (config.steps - merge) * (n + 1))


class TokenTrainer:
    """Learns one token per concept from a localization (masks m_i and centroids f_i, Eq. 7).

    Args:
        pipe: a loaded SD pipeline (frozen; only new token vectors train).
        image: the source photo (RGB), fed at ``work_size`` (W, H) — the size localization used.
        masks: (N, h, w) bool latent masks m_i.
        centroids: (N, h·w) float centroids f_i (Eq. 6).
        config: :class:`TrainConfig`.
    """

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        image: Image.Image,
        work_size: tuple[int, int],
        masks: torch.Tensor,
        centroids: torch.Tensor,
        config: TrainConfig | None = None,
        *,
        runtime: RuntimeConfig | None = None,
    ):
        self.pipe = pipe
        self.config = cfg = config or TrainConfig()
        # How the work runs (micro-batch, precision, checkpoints); not in the fingerprint, so resume accepts another.
        self.runtime = runtime or cfg.runtime
        self.device = pipe.unet.device
        self.n = int(masks.shape[0])
        if self.n < 1:
            raise ConfigError("token learning needs at least one concept mask, got 0")
        self.g = cfg.tokens_per_concept
        # What differs between SD 1.x/2.x and SDXL (text encoders, pooled embedding, time ids): models.family.
        self.family = family_of(pipe)
        # The concepts live on the clustering grid (the latent for SD 1.x/2.x, latent/2 for SDXL, DESIGN §9).
        grid_hw = (int(masks.shape[1]), int(masks.shape[2]))
        self.masks = masks.bool().cpu()  # (N, h_g, w_g)
        self.centroids = centroids.float().cpu().reshape(self.n, *grid_hw)  # (N, h_g, w_g)
        self.work_size = tuple(work_size)
        self._fingerprint = self._make_fingerprint(image)

        # 1. Cached VAE posterior of the image and of its mirror image (the flip augmentation).
        vae = pipe.vae
        pixels = image_to_tensor(image, self.work_size)  # (1, 3, H, W) in [-1, 1]
        pixels = torch.cat([pixels, pixels.flip(-1)]).to(self.device, vae.dtype)  # (2, 3, H, W)
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        scale = vae.config.scaling_factor
        self.post_mean = (dist.mean * scale).float()  # (2, 4, h, w)
        self.post_std = (dist.std * scale).float()
        self.latent_hw = (int(self.post_mean.shape[-2]), int(self.post_mean.shape[-1]))
        if self.latent_hw != grid_hw:
            # SDXL: masks of the latent/2 clustering grid, nearest-upsampled to the latent for the loss (Eq. 8).
            if self.family.clustering_grid(pipe, self.latent_hw) != grid_hw:
                raise ConfigError(
                    f"masks are {grid_hw} but the image at {self.work_size} gives a latent of {self.latent_hw}: "
                    "localize and train at the same resolution"
                )
            self.masks = F.interpolate(self.masks[:, None].float(), size=self.latent_hw, mode="nearest")[:, 0] > 0.5
        # SDXL's micro-conditioning: the photo's size, no crop, the size it is fed at (None for SD 1.x/2.x).
        self.time_ids = self.family.micro_conditioning(
            (image.height, image.width), (self.work_size[1], self.work_size[0])
        )

        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.prediction_type = self.scheduler.config.prediction_type

        # 2. Token vectors (Eq. 9): g·N rows, initialized from random vocabulary rows (seeded) or the user's words.
        self.generator = torch.Generator().manual_seed(cfg.seed)
        bases = [e.get_input_embeddings() for e in self.family.text_encoders(pipe)]
        toks = self.family.tokenizers(pipe)
        self.dims = tuple(b.embedding_dim for b in bases)  # each encoder's part of a token vector
        # None: the family's default (on for SDXL at 1024 px, off for SD 1.x/2.x).
        ckpt = self.runtime.gradient_checkpointing
        self.gradient_checkpointing = self.family.gradient_checkpointing if ckpt is None else ckpt
        # (g·N, ΣD) float32: one vector per token, concatenated over the family's text encoders (SDXL: 768 + 1280).
        self.vectors = torch.nn.Parameter(self._initial_vectors(bases, toks).to(self.device))
        self.optimizer = torch.optim.AdamW(
            [self.vectors], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=cfg.weight_decay
        )
        self.builder = PromptBuilder(toks, [b.num_embeddings for b in bases])
        self.split_prompts = self._split_prompts()
        self.merged_prompts = self._merged_prompts()

        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.sample_passes = 0
        self.optimizer_steps = 0
        # 3. Mixed precision: autocast dtype, and loss scaling whenever the UNet computes in fp16.
        self.amp_dtype = self._amp_dtype()
        compute_dtype = self.amp_dtype or pipe.unet.dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=compute_dtype == torch.float16)
        self._last_scale = self.scaler.get_scale()
        self.skipped_steps = 0
        self._targets: dict[tuple[int, int], torch.Tensor] = {}

    def _initial_vectors(self, bases: list[torch.nn.Embedding], toks: list) -> torch.Tensor:
        """(g·N, ΣD) float32 starting vectors: random vocabulary rows (paper §3.3), or each concept's initializer
        word (``TrainConfig.init_words``) for all of its g rows; one row per id and encoder, concatenated."""
        words = self.config.init_word_list
        if words:
            if len(words) != self.n:
                raise ConfigError(
                    f"`init_words` names {len(words)} words ({','.join(words)}) but there are {self.n} concepts; "
                    "give one word per concept, in concept order"
                )
            return init_from_words(bases, [word_token_ids(tok, words) for tok in toks], self.g)
        special = sorted({i for tok in toks for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) if i is not None})
        return init_from_vocabulary(bases, self.n * self.g, self.generator, exclude=special)

    # ------------------------------------------------------------------ prompts
    def _split_prompts(self) -> list[Prompt]:
        # Row k = j·N + i holds split token j of concept i (the released code's order and layout).
        prompts = []
        for k in range(self.g * self.n):
            i, j = k % self.n, k // self.n
            name = f"<c{i + 1}>" if self.g == 1 else f"<c{i + 1}.{j + 1}>"
            prompts.append(self.builder.build([k], [i], [name]))
        return prompts

    def _merged_prompts(self) -> list[Prompt]:
        names = [f"<c{i + 1}>" for i in range(self.n)]
        prompts = [self.builder.build([i], [i], [names[i]]) for i in range(self.n)]
        prompts.append(self.builder.build(list(range(self.n)), list(range(self.n)), names))
        return prompts

    @property
    def merged(self) -> bool:
        return self.step >= self.config.merge_step

    def prompts(self) -> list[Prompt]:
        return self.merged_prompts if self.merged else self.split_prompts

    # ------------------------------------------------------------------ the loop
    def train(
        self,
        checkpoint_dir: str | Path | None = None,
        resume: bool = False,
        callbacks: Sequence[StepCallback] = (),
    ) -> TrainResult:
        cfg, rt = self.config, self.runtime
        if resume and checkpoint_dir is not None:
            self._resume(checkpoint_dir)
        unet = self.pipe.unet
        if self.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        try:
            with spliced_tokens(self.family.text_encoders(self.pipe), self.vectors) as wrapper:
                self._wrapper = wrapper
                while self.step < cfg.steps:
                    if self.step == cfg.merge_step and self.g > 1:
                        self.merge()
                    record = self.train_step()
                    self.step += 1
                    record["step"] = self.step
                    self.history.append(record)
                    if checkpoint_dir is not None and rt.checkpoint_every and (
                        self.step % rt.checkpoint_every == 0 or self.step == cfg.steps
                    ):
                        save_checkpoint(checkpoint_dir, self.state())
                    for callback in callbacks:
                        callback(self, record)
        finally:
            self._wrapper = None
            if self.gradient_checkpointing:
                unet.disable_gradient_checkpointing()
        return TrainResult(
            embeddings=self.embeddings(),
            history=list(self.history),
            sample_passes=self.sample_passes,
            optimizer_steps=self.optimizer_steps,
            steps=self.step,
            skipped_steps=self.skipped_steps,
        )

    def embeddings(self) -> torch.Tensor:
        """Current token of each concept, (N, D) float32 on CPU (row i of the merged layout)."""
        return self.vectors.detach()[: self.n].float().cpu().clone()

    @torch.no_grad()
    def merge(self) -> None:
        """Split-and-merge: concept i's token = mean of its g split vectors (rows i, N+i, …), kept in row i."""
        v = self.vectors.data  # (g·N, D)
        merged = v.view(self.g, self.n, -1).mean(0)  # (N, D)
        v[: self.n] = merged

    def train_step(self) -> dict[str, Any]:
        prompts = self.prompts()
        batch = self._draw_step(len(prompts))  # 2. the step's randomness
        per_prompt, stats = self._token_gradients(prompts, *batch)  # 3. UNet passes
        skip = self._unscale(per_prompt)
        stats.update(self._optimizer_steps(per_prompt, skip))  # 4. contrastive term and AdamW step(s)
        stats["loss"] = stats["mse"] + self.attention_weight * stats["reg"] + self.config.alpha * stats["con"]
        if self.scaler.is_enabled():
            stats["loss_scale"] = self._last_scale
            stats["skipped"] = skip
        stats["phase"] = "merged" if self.merged else "split"
        stats["prompts"] = len(prompts)
        return stats

    def _draw_step(self, b_total: int) -> tuple[torch.Tensor, ...]:
        """Flip, latents, noise, timesteps, masks and centroids of one step, drawn from the CPU generator in a
        fixed order (so a step is the same on any device and micro-batch)."""
        gen = self.generator
        flip = bool(torch.rand((), generator=gen) < self.config.flip_p)
        shape = (b_total, *self.post_mean.shape[1:])
        z_noise = torch.randn(shape, generator=gen)
        noise = torch.randn(shape, generator=gen)
        timesteps = torch.randint(0, self.num_train_timesteps, (b_total,), generator=gen)

        side = 1 if flip else 0
        latents = self.post_mean[side] + self.post_std[side] * z_noise.to(self.device)  # (B, 4, h, w)
        masks = self.masks.flip(-1) if flip else self.masks  # (N, h, w)
        centroids = self.centroids.flip(-1) if flip else self.centroids
        return latents, noise.to(self.device), timesteps.to(self.device), masks, centroids

    def _token_gradients(self, prompts, latents, noise, timesteps, masks, centroids) -> tuple[torch.Tensor, dict]:
        """Per-prompt token gradients (B, K, D) of (1/B)(L_b + β R_b), Eq. 12/13, one backward per micro-batch
        (multiplied by the loss scale in fp16), and the step's mean ε-MSE and attention term."""
        b_total = len(prompts)
        per_prompt = torch.zeros(b_total, *self.vectors.shape, device=self.device)  # (B, K, D)
        stats = {"mse": 0.0, "reg": 0.0}
        micro = self.runtime.micro_batch or b_total
        weight = 1.0 / b_total  # Eq. 12/13: mean over the step's prompts
        for start in range(0, b_total, micro):
            idx = list(range(start, min(start + micro, b_total)))
            grads, mse, reg = self._micro_batch(
                [prompts[i] for i in idx], latents[idx], noise[idx], timesteps[idx], masks, centroids, weight
            )
            per_prompt[idx] = grads
            stats["mse"] += float(mse.sum()) / b_total
            stats["reg"] += float(reg.sum()) / b_total
        self.sample_passes += b_total
        return per_prompt, stats

    def _optimizer_steps(self, per_prompt: torch.Tensor, skip: bool) -> dict[str, Any]:
        """The contrastive term (split phase) and the AdamW step(s) of the update rule; ``{"con", "grad_norm"}``.

        ``batched``: one step on the mean gradient. ``released``: each prompt's own loss (unweighted, as the
        released code steps on it) in prompt order, with the contrastive term re-evaluated at the current vectors
        before each step. A skipped fp16 step (overflow) only records the contrastive value.
        """
        cfg = self.config
        b_total = per_prompt.shape[0]
        use_con = not self.merged and cfg.contrastive and cfg.alpha > 0 and self.g > 1
        paper = cfg.contrastive_form == "paper"
        con = 0.0
        norms = []
        if skip:
            if use_con:
                con = self._contrastive_grad(paper=paper)[1]
        elif cfg.update_rule == "batched":
            grad = per_prompt.sum(0)  # (K, D): ∇ of (1/B)Σ_b (L_b + β R_b)
            if use_con:
                con_grad, con = self._contrastive_grad(paper=paper)
                grad += con_grad
            norms.append(self._apply(grad))
        else:
            for b in range(b_total):
                grad = per_prompt[b] * b_total
                if use_con:
                    con_grad, con = self._contrastive_grad(paper=paper)
                    grad = grad + con_grad
                norms.append(self._apply(grad))
        # Token-gradient norm before clipping (the largest of the step's optimizer steps).
        return {"con": con, "grad_norm": max(norms) if norms else None}

    def _apply(self, grad: torch.Tensor) -> float:
        """One AdamW step on the token gradient ``grad`` (K, D), clipped to ``max_grad_norm``; returns its norm."""
        grad = grad.to(self.vectors.dtype)
        norm = float(torch.linalg.vector_norm(grad))
        limit = self.config.max_grad_norm
        if limit > 0 and norm > limit:
            # torch.nn.utils.clip_grad_norm_'s rule (what the released code's accelerate call runs).
            grad = grad * (limit / (norm + 1e-6))
        self.vectors.grad = grad
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return norm

    def _unscale(self, per_prompt: torch.Tensor) -> bool:
        """Undo the fp16 loss scale of a step's gradients (B, K, D) in place; True if the step must be skipped.

        GradScaler's own bookkeeping decides: its ``unscale_`` records whether the step's summed gradient holds
        inf/NaN, and ``update()`` halves the scale after such a step (and doubles it after 2000 clean ones). The
        per-prompt gradients are divided by the same scale here, since the optimizer steps on them one by one.
        """
        if not self.scaler.is_enabled():
            return False
        self._last_scale = scale = self.scaler.get_scale()
        self.vectors.grad = per_prompt.sum(0)  # (K, D)
        self.scaler.unscale_(self.optimizer)
        self.vectors.grad = None
        skip = not bool(torch.isfinite(per_prompt).all())
        per_prompt.mul_(1.0 / scale)
        self.scaler.update()
        if skip:
            self.skipped_steps += 1
            logger.warning(
                "step %d: fp16 token gradient overflowed at loss scale %g; optimizer step skipped, scale lowered to %g",
                self.step + 1, scale, self.scaler.get_scale(),
            )
        return skip

    def _contrastive_grad(self, paper: bool) -> tuple[torch.Tensor, float]:
        cfg = self.config
        k = self.g * self.n
        labels = torch.arange(k, device=self.device) % self.n  # row j·N + i belongs to concept i
        with torch.enable_grad():
            v = self.vectors.detach()[:k].clone().requires_grad_(True)
            if paper:
                # Eq. 12: (1/(gN)) Σ_ij α L^con_ij with L^con_ij of Eq. 10 (which carries its own 1/(gN)).
                con = losses.contrastive_loss(v, labels, tau=cfg.tau).sum() / k
            else:
                con = losses.supcon_loss(v, labels, tau=cfg.tau)
            (cfg.alpha * con).backward()
        grad = torch.zeros_like(self.vectors)
        grad[:k] = v.grad
        return grad, float(con.detach())

    def _micro_batch(self, prompts, latents, noise, timesteps, masks, centroids, weight):
        """Forward + backward of a few prompts; returns (per-prompt vector grads (b, K, D), mse (b,), reg (b,))."""
        cfg = self.config
        unet = self.pipe.unet
        b = len(prompts)
        input_ids = torch.stack([p.input_ids for p in prompts]).to(self.device)  # (b, E, L), E text encoders
        leaf = self.vectors.detach().unsqueeze(0).repeat(b, 1, 1).requires_grad_(True)  # (b, K, D)
        self._wrapper.batch_vectors = leaf
        if cfg.attn_reg and self.attention_weight > 0:

            width = max(len(p.positions) for p in prompts)
            # Ragged prompts: pad positions by repeating the first one; padded slots are never read.
            pos = torch.tensor([list(p.positions) + [p.positions[0]] * (width - len(p.positions)) for p in prompts])
            acc = CrossAttentionAccumulator(self.latent_hw, pos, keep_grad=True)
            capture = capture_attention(unet, self.latent_hw, cross_attention=acc)
        else:
            acc, capture = None, contextlib.nullcontext()
        amp_dtype = self.amp_dtype
        autocast = (
            torch.autocast(self.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
        )
        # backward() runs inside the capture block: under gradient checkpointing the UNet blocks are re-run
        # during backward and must find the capturing processors still installed.
        with torch.enable_grad(), capture:
            with autocast:
                pred, target = self._denoise(input_ids, latents, noise, timesteps)  # (b, 4, h, w) each
            # Eq. 8: mask = union of the masks of the prompt's concepts (joint prompt: all concepts).
            union = torch.stack([masks[list(p.concepts)].any(0) for p in prompts]).to(self.device)  # (b, h, w)
            mse = losses.masked_denoising_loss(pred.float(), target.float(), union.float())  # (b,)
            reg = torch.zeros(b, device=self.device)
            if acc is not None:
                maps = self._token_attention(acc)  # (b, width, h4, w4)
                reg = self.attention_loss(maps, prompts, masks, centroids)  # (b,)
            loss = (mse + self.attention_weight * reg) * weight
            self.scaler.scale(loss.sum()).backward()  # the identity unless fp16 loss scaling is on
        self._wrapper.batch_vectors = None
        return leaf.grad.detach(), mse.detach(), reg.detach()

    def _denoise(self, input_ids, latents, noise, timesteps) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's part of a micro-batch: (UNet prediction, denoising target), each (b, 4, h, w).

        The learnable rows reach the text encoder through the spliced wrapper (``batch_vectors``); a test replaces
        this method with a stub denoiser to check Eq. 12/13 by hand.
        """
        pipe, unet = self.pipe, self.pipe.unet
        # The context (b, L, ΣD) and, for SDXL, the pooled embedding recomputed from the token (it depends on it).
        cond = self.family.encode(pipe, input_ids.unbind(1), time_ids=self.time_ids, dtype=self.amp_dtype or unet.dtype)
        noisy = self.scheduler.add_noise(latents, noise, timesteps).to(unet.dtype)
        pred = unet(noisy, timesteps, **self.family.unet_kwargs(cond)).sample  # (b, 4, h, w)
        if self.prediction_type == "v_prediction":
            return pred, self.scheduler.get_velocity(latents, noise, timesteps)
        return pred, noise

    def _token_attention(self, acc) -> torch.Tensor:
        """Cross-attention of each prompt's learnable tokens captured during :meth:`_denoise`, (b, width, h4, w4)."""
        return acc.result(resize=False)

    # ------------------------------------------------------------------ overridable parts (baselines)
    @property
    def attention_weight(self) -> float:
        """Weight of :meth:`attention_loss` in a prompt's loss (β of Eq. 12–13)."""
        return self.config.beta

    def attention_loss(self, maps: torch.Tensor, prompts: list[Prompt], masks: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
        """Eq. 11 summed over each prompt's tokens: EMD(c_[V], f_i) at the attention's resolution.

        ``maps`` (b, width, h4, w4) token cross-attention (slot s of prompt r at ``maps[r, s]``); ``masks``
        (N, h, w) and ``centroids`` (N, h, w) already flipped with the step. Returns (b,).
        """
        pairs = [(r, s, p.concepts[s]) for r, p in enumerate(prompts) for s in range(len(p.positions))]
        targets = self._emd_targets(centroids, maps.shape[-2:])  # (N, h4, w4)
        emd = losses.emd_loss(
            torch.stack([maps[r, s] for r, s, _ in pairs]),
            torch.stack([targets[c] for _, _, c in pairs]),
            method=self._emd_method(),
        )  # (pairs,)
        rows = torch.tensor([r for r, _, _ in pairs], device=maps.device)
        return torch.zeros(len(prompts), device=maps.device, dtype=emd.dtype).index_add(0, rows, emd)

    def _emd_targets(self, centroids: torch.Tensor, hw) -> torch.Tensor:
        # f_i at the attention's resolution: area averaging keeps it a distribution of the same mass.
        hw = (int(hw[0]), int(hw[1]))
        return F.adaptive_avg_pool2d(centroids.unsqueeze(1), hw).squeeze(1).to(self.device)  # (N, h4, w4)

    def _emd_method(self) -> str:
        m = self.config.emd_method
        if m == "auto":
            return "sinkhorn" if self.device.type == "cuda" else "exact"
        return m

    def _amp_dtype(self) -> torch.dtype | None:
        """Autocast dtype of the forward passes: explicit fp16/bf16 on any device, ``auto`` on CUDA only."""
        mp = self.runtime.mixed_precision
        if mp == "no":
            return None
        if mp != "auto":
            return torch.float16 if mp == "fp16" else torch.bfloat16
        if self.device.type != "cuda":
            return None
        # bf16 has fp32's exponent range: no loss scaling needed. Older GPUs (before Ampere) get fp16 + GradScaler.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    # ------------------------------------------------------------------ checkpoints
    def _make_fingerprint(self, image: Image.Image) -> str:
        h = hashlib.sha256()
        config = asdict(self.config)
        if config["init_words"] is None:
            del config["init_words"]  # random initialization: the fingerprint of runs made before the option existed
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        h.update(self.masks.numpy().tobytes())
        h.update(self.centroids.numpy().tobytes())
        h.update(image.tobytes())
        return h.hexdigest()[:16]

    def state(self) -> TrainState:
        st = self.optimizer.state.get(self.vectors, {})
        return TrainState(
            step=self.step,
            vectors=self.vectors.detach(),
            exp_avg=st.get("exp_avg"),
            exp_avg_sq=st.get("exp_avg_sq"),
            adam_step=float(st["step"]) if "step" in st else 0.0,
            generator_state=self.generator.get_state(),
            history=list(self.history),
            sample_passes=self.sample_passes,
            fingerprint=self._fingerprint,
        )

    def _resume(self, folder: str | Path) -> None:
        state = load_checkpoint(folder)
        if state is None:
            return
        if state.fingerprint != self._fingerprint:
            raise ConfigError(
                f"checkpoint in {str(folder)!r} belongs to another image, localization (edited since?) or config; "
                "run without --resume (or with a new --out) to start over"
            )
        with torch.no_grad():
            self.vectors.copy_(state.vectors.to(self.device))
        if state.exp_avg is not None:
            self.optimizer.state[self.vectors] = {
                "step": torch.tensor(state.adam_step),
                "exp_avg": state.exp_avg.to(self.device),
                "exp_avg_sq": state.exp_avg_sq.to(self.device),
            }
        self.generator.set_state(state.generator_state)
        self.step = state.step
        self.history = list(state.history)
        self.sample_passes = state.sample_passes
        self.optimizer_steps = sum(
            0 if r.get("skipped") else 1 if self.config.update_rule == "batched" else r["prompts"] for r in self.history
        )
        self.skipped_steps = sum(bool(r.get("skipped")) for r in self.history)
        if self.scaler.is_enabled() and self.history and "loss_scale" in self.history[-1]:
            # The scale itself is not checkpointed: restart from the last one used (halved if that step overflowed).
            last = self.history[-1]
            self.scaler = torch.amp.GradScaler(
                self.device.type, init_scale=last["loss_scale"] / (2.0 if last.get("skipped") else 1.0)
            )
        logger.info("resumed from step %d", self.step)


def loss_curve_image(history: Sequence[dict[str, Any]], size: tuple[int, int] = (640, 320)) -> Image.Image:
    """A small PIL line plot of the total loss per step (log scale), with the merge step marked."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    values = [max(float(r["loss"]), 1e-12) for r in history]
    if not values:
        return img
    logs = [math.log10(v) for v in values]
    lo, hi = min(logs), max(logs)
    span = hi - lo or 1.0
    left, top, right, bottom = 50, 20, w - 10, h - 30
    draw.rectangle([left, top, right, bottom], outline="black")
    n = len(values)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(n - 1, 1))
        y = bottom - (bottom - top) * ((v - lo) / span)
        return x, y

    merge = next((i for i, r in enumerate(history) if r.get("phase") == "merged"), None)
    if merge:
        x, _ = xy(merge, lo)
        draw.line([x, top, x, bottom], fill=(200, 200, 200))
        draw.text((x + 3, top + 2), "merge", fill=(120, 120, 120))
    draw.line([xy(i, v) for i, v in enumerate(logs)], fill=(31, 119, 180), width=2)
    draw.text((5, top), f"{10 ** hi:.3g}", fill="black")
    draw.text((5, bottom - 10), f"{10 ** lo:.3g}", fill="black")
    draw.text((left, bottom + 8), f"step 1 … {n}   (loss, log scale)", fill="black")
    return img
