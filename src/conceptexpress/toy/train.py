"""Train the toy Stable Diffusion from scratch on the toy world (``python -m conceptexpress.toy train OUT``).

Two stages, each saved before the next starts (a rerun skips a finished stage):

1. **VAE** (AutoencoderKL, factor 2: 64 px ↔ 4×32×32): reconstruction MSE + a small KL; the latent scaling
   factor is set to 1 / std of the latents, as SD's 0.18215 was.
2. **Text encoder + UNet** jointly (CLIPTextModel from scratch, UNet2DConditionModel with attention at latent/2
   and latent/4 and the mid block): ε-prediction MSE on DDPM timesteps (SD's scaled-linear schedule), caption
   dropout to ``""`` for classifier-free guidance, an EMA of the UNet and text encoder, and an *attention
   supervision* term: at the cross-attention layers, each object's colour and shape tokens are pushed to spend
   their spatial attention inside their object, and the [EOT] token (of the caption and of ``""``) towards the
   uniform distribution over the union of the objects; at the self-attention layers, each pixel towards the uniform
   distribution over its own region (object or background) — the properties that SD shows at scale and that the
   method relies on (paper §3.2 Eq. 5–6 and §3.4). See benchmarks/results/toy/HISTORY.md for why (run7).

Options tried in runs 2, 4 and 5 (benchmarks/results/toy/HISTORY.md), off by default because the shipped run15 does not use them:
min-SNR-γ weighting of the ε loss (``min_snr``, Hang et al. 2023); a pool of ``data_pool`` scenes encoded once by the
VAE (encoding every batch afresh is a large part of a step on a CPU), each step drawing its batch from the pool by a
seeded permutation; a linear learning-rate decay (``decay_steps``); other UNet block widths (``channels``, run13).
``self_attn_target="mass"`` is run2's form of the self-attention term and ``eot_target="mass"`` runs 1–6's form of the
[EOT] term.

**Caption contrast** (``contrast``, default ``"shape"``: run15, the shipped weights; docs/toy-world.md): a diffusion classifier's
cross-entropy (Li et al. 2023): for a few captioned samples per batch, the ε-MSE under the true caption must be lower
than under wrong captions that change one object's shape, colour or presence (``contrast_captions``), at the same
noisy latent, timestep and noise. Plain ε-prediction trains the model to *use* the caption only as far as it lowers
the MSE; run10 drew circles for most shape words (its shapes read right 60 % of the time; run15, with the term from
step 0, 98 %). ``contrast="none"`` turns it off (runs 1–13). ``init`` fine-tunes from a toy pipeline folder (run14:
run10's weights; no VAE stage, the EMA starts at the init).

``precision="bf16"`` (run11; the default since run15) runs the UNet-stage forward under bf16 autocast (the losses,
the optimizer and the EMA stay fp32): 0.88 s against 1.08 s a step on this project's 2-core CPU (which has AMX-bf16),
so more steps fit the 90-minute budget; ``"fp32"`` is runs 1–10's arithmetic (on a CPU without bf16 support it may be
the faster one).

Deterministic on CPU for a given seed, thread count and precision. ``device="cuda"`` trains on a GPU (every random number is
still drawn on the CPU, so the scenes, timesteps and noise are a CPU run's; the arithmetic is not bit-identical).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .tokenizer import write_toy_tokenizer
from .world import COLORS, IMAGE_SIZE, SHAPES, caption_for, caption_objects, render_scene

TRAIN_SEED_OFFSET = 1_000_000  # training scenes are seeds >= 1e6; held-out scenes (benchmarks, tests) are < 1e6
ATTN_TARGETS = ("mass", "uniform")  # forms of the [EOT] supervision (_attention_loss)
SELF_ATTN_TARGETS = ("mass", "uniform", "mixture")  # forms of the self-attention supervision (_self_attention_loss)
PRECISIONS = ("fp32", "bf16")  # UNet-stage forward precision (ToyTrainConfig.precision)
CHANNELS = (32, 64, 96, 96)  # the shipped UNet's block widths (latent, /2, /4, /8); ToyTrainConfig.channels
CONTRAST_KINDS = ("shape", "colour", "count")  # caption alternatives of the contrast term (contrast_captions)


@dataclass(frozen=True)
class ToyTrainConfig:
    """Defaults = the recipe of the shipped weights (docs/toy-world.md, run15: run10's recipe — run7's on the upright
    world; run3's, i.e. run1's for 3,000 steps, with the self-attention supervised towards each region's uniform
    distribution and the [EOT] towards the uniform distribution over the objects — plus the shape caption contrast,
    under bf16 autocast); the pool, min-SNR and decay options are the run2 / run4 / run5 experiments, off by default.
    run10's recipe: ``contrast="none", precision="fp32"``; run7's: also ``upright=False``; run3's: also
    ``self_attn_weight=0, eot_target="mass"``."""

    seed: int = 0
    vae_steps: int = 300  # AutoencoderKL steps
    vae_batch: int = 16
    vae_lr: float = 2e-3
    steps: int = 3000  # UNet + text-encoder steps (run1 stopped at 1200; run3, shipped, 3000)
    batch: int = 32
    lr: float = 1e-3  # AdamW, constant after warm-up (so, without decay, a checkpoint at step k = a run of k steps)
    warmup: int = 100
    decay_steps: int = 0  # linear decay of lr to 0 over the last N steps (0 = none; run5 tried 900)
    ema: float = 0.995
    caption_dropout: float = 0.15  # "" for classifier-free guidance (and the localization prompt)
    attn_weight: float = 0.02  # attention supervision λ
    self_attn_weight: float = 0.05  # self-attention supervision λ_self (0 = off, as in runs 1, 3–5)
    self_attn_target: str = "uniform"  # KL from the uniform over the pixel's region (runs 6, 7); "mass": run2's form
    eot_target: str = "uniform"  # [EOT] → union of objects: KL from its uniform (run7); "mass" (runs 1–6)
    latent_attention: bool = False  # attention at the 32×32 latent too (run9; see unet_config)
    channels: str = ",".join(map(str, CHANNELS))  # UNet block widths, as text for the command line (run13: wider)
    upright: bool = True  # squares and triangles unrotated (since run10); False: the rotated world of runs 1–9
    attn_max_t: int = 600  # supervise attention only for t < this (at high noise the layout is not visible)
    min_snr: float = 0.0  # min-SNR-γ loss weighting (0 = plain ε-MSE; run2 tried 5)
    data_pool: int = 0  # scenes encoded once and reused (0 = fresh scenes every step, encoded per batch)
    save_every: int = 400
    threads: int = 2
    device: str = "cpu"  # "cuda" on a GPU: random numbers are still drawn on the CPU, so the data and noise match
    precision: str = "bf16"  # autocast the text encoder and UNet forward (losses in fp32; run15); "fp32": runs 1–10, 12–14
    init: str = ""  # a toy pipeline folder to fine-tune (its VAE kept: no VAE stage; its UNet's widths as they are)
    first_scene: int = 0  # index of the first training scene (a fine-tune continues after its run's: run10 saw 96,000)
    contrast: str = "shape"  # caption-contrast kinds, comma-separated, of CONTRAST_KINDS ("none" = off: runs 1–13)
    contrast_weight: float = 0.005  # λ_c of the caption-contrast term (contrast_loss)
    contrast_tau: float = 1e-3  # its temperature: logits = −ε-MSE / τ
    contrast_batch: int = 8  # captioned samples of each batch it is computed on (UNet passes: contrast_width)

    @property
    def block_channels(self) -> tuple[int, ...]:
        """``channels`` as integers (``CHANNELS`` by default); empty when it does not parse."""
        try:
            return tuple(int(w) for w in self.channels.split(","))
        except ValueError:
            return ()

    @property
    def contrast_kinds(self) -> tuple[str, ...]:
        """``contrast`` as a tuple of kinds (empty: the term is off)."""
        if self.contrast.strip() in ("", "none"):
            return ()
        return tuple(k.strip() for k in self.contrast.split(",") if k.strip())

    def __post_init__(self):
        if self.self_attn_target not in SELF_ATTN_TARGETS:
            raise ValueError(f"--self-attn-target must be one of {', '.join(SELF_ATTN_TARGETS)}, "
                             f"not {self.self_attn_target!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.eot_target not in ATTN_TARGETS:
            raise ValueError(f"--eot-target must be one of {', '.join(ATTN_TARGETS)}, not {self.eot_target!r}")
        bad = [k for k in self.contrast_kinds if k not in CONTRAST_KINDS]
        if bad or (self.contrast.strip() not in ("", "none") and not self.contrast_kinds):
            raise ValueError(f"--contrast must be none or comma-separated kinds of {', '.join(CONTRAST_KINDS)}, "
                             f"not {self.contrast!r}")
        if self.contrast_kinds and (self.contrast_tau <= 0 or self.contrast_batch < 1):
            raise ValueError("--contrast-tau must be > 0 and --contrast-batch >= 1")
        if self.init and not (Path(self.init) / "model_index.json").is_file():
            raise ValueError(f"--init {self.init!r} is not a toy pipeline folder (no model_index.json there)")
        if self.init and (self.latent_attention or self.channels != ",".join(map(str, CHANNELS))):
            raise ValueError("--init fine-tunes the folder's UNet as it is: drop --channels / --latent-attention")
        widths = self.block_channels
        if len(widths) != 4 or any(w <= 0 or w % 8 for w in widths):
            raise ValueError(f"--channels must be 4 comma-separated multiples of 8, not {self.channels!r}")
        try:
            torch.device(self.device)
        except RuntimeError:
            raise ValueError(f"--device {self.device!r} is not a torch device (cpu, cuda, cuda:1, …)") from None


def check_device(cfg: ToyTrainConfig) -> None:
    """Refuse, before any work, a device this machine does not have (``ValueError``)."""
    if torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {cfg.device}: torch sees no CUDA device here")


def learning_rate(cfg: ToyTrainConfig, step: int) -> float:
    """The UNet stage's learning rate at ``step`` (0-based): linear warm-up over ``warmup`` steps, constant, then
    (``decay_steps`` > 0) a linear decay that reaches 0 after the last step."""
    lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
    if cfg.decay_steps:
        lr *= min(1.0, (cfg.steps - step) / cfg.decay_steps)
    return lr


def unet_config(latent_attention: bool = False, channels: tuple[int, ...] = CHANNELS) -> dict:
    """Latent 32×32 (64 px); self- and cross-attention at 16×16 (latent/2) and 8×8 (latent/4), mid block 4×4;
    ``latent_attention`` (run9) adds them at 32×32 (the latent resolution, as SD has at 64×64) — ~2.3× a step on CPU.
    ``channels``: the block widths (run13 tried wider ones)."""
    top = "CrossAttn" if latent_attention else ""
    return dict(
        sample_size=IMAGE_SIZE // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=(f"{top}DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", f"{top}UpBlock2D"),
        attention_head_dim=(1, 2, 2, 2),
        cross_attention_dim=64,
        use_linear_projection=True,
        norm_num_groups=8,
        norm_eps=1e-5,
        act_fn="silu",
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        mid_block_add_attention=False,
    )


def _text_encoder(vocab_size: int, bos: int, eos: int):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            projection_dim=64,
            hidden_act="gelu",
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=0,
        )
    )


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def _images(seeds: list[int], device: str, upright: bool) -> tuple[torch.Tensor, list]:
    scenes = [render_scene(s, upright=upright) for s in seeds]
    x = np.stack([np.asarray(s.image, dtype=np.float32) for s in scenes])  # (B, H, W, 3)
    return (torch.from_numpy(x).permute(0, 3, 1, 2) / 127.5 - 1.0).to(device), scenes


def train_vae(out: Path, cfg: ToyTrainConfig, log) -> None:
    torch.manual_seed(cfg.seed)
    vae = _vae().to(cfg.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    for step in range(cfg.vae_steps):
        seeds = [TRAIN_SEED_OFFSET + 10_000_000 + step * cfg.vae_batch + i for i in range(cfg.vae_batch)]
        x, _ = _images(seeds, cfg.device, cfg.upright)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(cfg.device)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.mse_loss(rec, x) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.5f} ({time.time() - t0:.0f} s)")
    vae.eval()
    with torch.no_grad():
        x, _ = _images([TRAIN_SEED_OFFSET + 20_000_000 + i for i in range(64)], cfg.device, cfg.upright)
        mean = vae.encode(x).latent_dist.mean
        rec = vae.decode(mean).sample
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    vae.to("cpu").save_pretrained(out / "vae")
    log(f"vae done: rec mse {F.mse_loss(rec, x).item():.5f}, scaling_factor {1.0 / mean.std().item():.4f}")


class _CrossAttnProbe:
    """Attention processor that also keeps the head-averaged probabilities (B, N, L) for supervision
    (self-attention when ``encoder_hidden_states`` is None: L = N)."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        b, n, _ = hidden_states.shape
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))  # (B·h, N, d)
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))  # (B·h, L, d)
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (B·h, N, L)
        self.store.append(probs.view(b, -1, n, probs.shape[-1]).mean(1))  # (B, N, L)
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def _token_targets(scenes, captions: list[str]) -> list[list[tuple[int, int | None]]]:
    """Per sample: (token position, object index or None = union of objects) pairs to supervise."""
    out = []
    for scene, caption in zip(scenes, captions):
        words = caption.split()
        pairs: list[tuple[int, int | None]] = [(1 + len(words), None)]  # [EOT]
        for k, (colour, _shape) in enumerate(scene.objects):
            if colour in words:
                i = words.index(colour)
                pairs += [(1 + i, k), (2 + i, k)]  # colour word, shape word
        out.append(pairs)
    return out


def _attention_loss(store: list[torch.Tensor], scenes, targets, keep: torch.Tensor, eot_target: str = "mass"
                    ) -> torch.Tensor:
    """Cross-attention supervision, averaged over layers, samples and supervised tokens. A word token: −log(share of
    its spatial attention inside its object). The [EOT] token (target = the union of the objects): the same with
    ``eot_target="mass"`` (runs 1–6) — satisfied by attending to *one* object, which is what the trained models did
    (benchmarks/results/toy/HISTORY.md, run7) and what makes Eq. 5's filter drop every other object —, or with ``"uniform"`` (run7)
    KL(u ‖ p), u the area-weighted uniform distribution over the union and p the token's attention normalized over
    the pixels: every object gets its share, as SD's [EOT] map covers all salient objects (paper §3.2)."""
    if eot_target not in ATTN_TARGETS:
        raise ValueError(f"[EOT] target must be one of {ATTN_TARGETS}, not {eot_target!r}")
    losses = []
    for probs in store:  # (B, N, L)
        probs = probs.float()  # bf16 under autocast (precision="bf16"); the loss is computed in fp32
        side = int(math.isqrt(probs.shape[1]))
        for b, (scene, pairs) in enumerate(zip(scenes, targets)):
            if not keep[b]:
                continue
            m = torch.from_numpy(scene.masks.astype(np.float32))[:, None].to(probs.device)  # (K, 1, H, W)
            m = F.adaptive_avg_pool2d(m, side).flatten(1)  # (K, N) area fractions
            for pos, k in pairs:
                target = m.sum(0).clamp(max=1) if k is None else m[k]
                a = probs[b, :, pos]
                if k is None and eot_target == "uniform":
                    u = target / target.sum().clamp(min=1e-8)
                    p_log = torch.log(a / a.sum() + 1e-6)
                    losses.append((u * (torch.log(u.clamp(min=1e-12)) - p_log)).sum())
                else:
                    losses.append(-torch.log((a * target).sum() / a.sum() + 1e-4))
    if not losses:
        return torch.zeros(())
    return torch.stack(losses).mean()


def _self_attention_loss(store: list[torch.Tensor], scenes, keep: torch.Tensor, target: str = "mass") -> torch.Tensor:
    """Self-attention supervision over the pixels that lie ≥ 90 % in one region (an object or the background),
    averaged per region (so a small object weighs as much as the background), at every self-attention layer.

    ``target="mass"`` (run2): −log(attention mass of the pixel inside its own region) — the pixel attends inside its
    region, but pixels of one object may still attend to different parts of it. ``target="uniform"`` (run6):
    KL(u_r ‖ p_i), u_r the area-weighted uniform distribution over the pixel's region r — every pixel of an object
    attends to the whole object, the object-shaped self-attention maps that SD shows at 16×16 and that DiffSeg and
    the clustering (KL between maps, paper §3.2) rely on. Zero when every pure pixel's map equals its region's u_r.

    ``target="mixture"`` (run8): every pixel, pure or not, towards t_i = Σ_r f_r(i) u_r, f_r(i) the share of region r
    in the pixel's cell — a cell on an object's edge attends like the regions it is made of. At 8×8 few cells of a
    small object are pure, so "uniform" leaves most of the object's and its border's self-attention unsupervised;
    the border cells then form rings of their own that pass Eq. 5. Weighted by Σ_r f_r(i) / area_r, averaged over
    the regions present; equal to "uniform" (threshold aside) when every cell is pure.
    """
    if target not in SELF_ATTN_TARGETS:
        raise ValueError(f"self-attention target must be one of {SELF_ATTN_TARGETS}, not {target!r}")
    losses = []
    idx = [b for b in range(len(scenes)) if keep[b]]
    if not idx:
        return torch.zeros(())
    for probs in store:  # (B, N, N)
        probs = probs.float()
        side = int(math.isqrt(probs.shape[1]))
        fr = []
        for b in idx:
            m = torch.from_numpy(scenes[b].masks.astype(np.float32))[:, None]  # (K, 1, H, W)
            m = F.adaptive_avg_pool2d(m, side).flatten(1)  # (K, N) area fractions
            f = torch.cat([(1 - m.sum(0, keepdim=True)).clamp(min=0), m])  # (1 + K, N): background first
            fr.append(F.pad(f, (0, 0, 0, 5 - f.shape[0])))  # (5, N)
        fr = torch.stack(fr).transpose(1, 2).to(probs.device)  # (b, N, 5) region fractions per pixel
        u = fr / fr.sum(1, keepdim=True).clamp(min=1e-8)  # (b, N, 5): u_r over the keys, per region ("uniform", "mixture")
        if target == "mixture":
            t = fr @ u.transpose(1, 2)  # (b, N, N): t_i = Σ_r f_r(i) u_r
            kl = (t * (torch.log(t.clamp(min=1e-12)) - torch.log(probs[idx] + 1e-8))).sum(-1)  # (b, N)
            area = fr.sum(1, keepdim=True)  # (b, 1, 5)
            w = (fr / area.clamp(min=1e-8)).sum(-1)  # (b, N): Σ_r f_r(i) / area_r
            losses.append((w * kl).sum() / (area > 1e-8).sum().clamp(min=1))
            continue
        own, label = fr.max(-1)  # (b, N)
        pure = own >= 0.9
        if target == "mass":
            mass = probs[idx] @ fr  # (b, N, 5) attention mass of each query in each region
            per_pixel = -torch.log(mass.gather(-1, label[..., None])[..., 0] + 1e-4)  # (b, N)
        else:
            cross = torch.log(probs[idx] + 1e-8) @ u  # (b, N, 5): Σ_j u_r(j) log p_i(j)
            neg_entropy = (u * torch.log(u.clamp(min=1e-12))).sum(1)  # (b, 5): Σ_j u_r(j) log u_r(j)
            per_pixel = (neg_entropy[:, None, :] - cross).gather(-1, label[..., None])[..., 0]  # KL(u_r ‖ p_i)
        onehot = F.one_hot(label, 5).float() * pure[..., None]  # (b, N, 5)
        count = onehot.sum(1, keepdim=True)  # (b, 1, 5) pure pixels per region
        w = (onehot / count.clamp(min=1)).sum(-1)  # (b, N): 1 / size of the pixel's region, 0 if not pure
        losses.append((w * per_pixel).sum() / (count > 0).sum().clamp(min=1))
    return torch.stack(losses).mean()


def contrast_captions(caption: str, kinds: tuple[str, ...], rng: np.random.Generator) -> list[str]:
    """Wrong captions for ``caption`` (a scene's true caption), each changing one object j drawn from ``rng``, in the
    order of ``kinds``: "shape" — two, j with each other shape (with the true caption, the diffusion classifier's
    full choice of j's shape); "colour" — one, j in a colour the scene does not use (with all four colours used: the
    next object's shape changes instead); "count" — one, j left out (or, for one object, an object of an unused
    colour and a random shape added). Every alternative describes a different scene than ``caption`` (each colour
    names one object). ``contrast_width(kinds)`` alternatives in all."""
    objs = caption_objects(caption)
    j = int(rng.integers(len(objs)))
    colour, shape = objs[j]
    free = [c for c in COLORS if c not in {c_ for c_, _ in objs}]

    def other_shape(s: str) -> str:
        rest = [x for x in SHAPES if x != s]
        return rest[int(rng.integers(len(rest)))]

    out = []
    for kind in kinds:
        o = list(objs)
        if kind == "shape":
            out += [caption_for([(colour, x) if i == j else ob for i, ob in enumerate(objs)])
                    for x in SHAPES if x != shape]
            continue
        if kind == "colour":
            if free:
                o[j] = (free[int(rng.integers(len(free)))], shape)
            else:
                k = (j + 1) % len(o)
                o[k] = (o[k][0], other_shape(o[k][1]))
        elif kind == "count":
            if len(o) > 1:
                del o[j]
            else:
                o.append((free[int(rng.integers(len(free)))], SHAPES[int(rng.integers(len(SHAPES)))]))
        else:
            raise ValueError(f"contrast kind must be one of {CONTRAST_KINDS}, not {kind!r}")
        out.append(caption_for(o))
    return out


def contrast_width(kinds: tuple[str, ...]) -> int:
    """How many wrong captions ``contrast_captions`` gives for ``kinds``."""
    return sum(len(SHAPES) - 1 if k == "shape" else 1 for k in kinds)


def contrast_loss(true_mse: torch.Tensor, alt_mse: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Caption contrast (a diffusion classifier's cross-entropy; Li et al. 2023, "Your diffusion model is secretly a
    zero-shot classifier"): per sample, logits −ε-MSE / τ over the true caption (``true_mse``, (n,)) and its wrong
    alternatives (``alt_mse``, (n, m)), all at the same noisy latent, timestep and noise; target the true caption.
    Returns (mean cross-entropy, share of samples whose true caption predicts the noise best)."""
    logits = -torch.cat([true_mse[:, None], alt_mse], 1) / tau
    ce = F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))
    return ce, (logits.argmax(1) == 0).float().mean()


def _token_ids(tokenizer, captions: list[str], device: str) -> torch.Tensor:
    """(B, 77) padded token ids of ``captions`` on ``device``."""
    return tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _encode_pool(vae, cfg: ToyTrainConfig, log) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) latents of the pool scenes TRAIN_SEED_OFFSET + i, i < data_pool."""
    means, stds = [], []
    t0 = time.time()
    with torch.no_grad():
        for start in range(0, cfg.data_pool, 64):
            seeds = [TRAIN_SEED_OFFSET + i for i in range(start, min(start + 64, cfg.data_pool))]
            x, _ = _images(seeds, cfg.device, cfg.upright)
            post = vae.encode(x).latent_dist
            means.append(post.mean)
            stds.append(post.std)
            if start % 4096 == 0:
                log(f"encoding pool {start}/{cfg.data_pool} ({time.time() - t0:.0f} s)")
    return torch.cat(means), torch.cat(stds)


def _batch_seeds(cfg: ToyTrainConfig, step: int) -> list[int]:
    """Scene indices of a step: fresh seeds, or a slice of a per-epoch seeded permutation of the pool."""
    if not cfg.data_pool:
        return [cfg.first_scene + step * cfg.batch + i for i in range(cfg.batch)]
    per_epoch = cfg.data_pool // cfg.batch
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([cfg.seed, epoch]).permutation(cfg.data_pool)
    return [int(i) for i in perm[k * cfg.batch:(k + 1) * cfg.batch]]


def train_unet(out: Path, cfg: ToyTrainConfig, log) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTokenizer

    torch.manual_seed(cfg.seed + 1)
    if cfg.init:  # a fine-tune: every component from the folder, in fp32 (the shipped weights are fp16)
        from diffusers import StableDiffusionPipeline

        from ..models.loading import dtype_kwargs

        init = StableDiffusionPipeline.from_pretrained(cfg.init, safety_checker=None, requires_safety_checker=False,
                                                       **dtype_kwargs(torch.float32))
        tokenizer, text_encoder, unet = init.tokenizer, init.text_encoder, init.unet
        vae = init.vae.eval().requires_grad_(False).to(cfg.device)
        text_encoder.train()
        unet.train()
    else:
        tok_dir = write_toy_tokenizer(out / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        vae = AutoencoderKL.from_pretrained(out / "vae").eval().requires_grad_(False).to(cfg.device)
        text_encoder = _text_encoder(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        unet = UNet2DConditionModel(**unet_config(cfg.latent_attention, cfg.block_channels))
    sf = vae.config.scaling_factor
    text_encoder.to(cfg.device)
    unet.to(cfg.device)
    sched = _scheduler()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    store: list[torch.Tensor] = []
    probe = _CrossAttnProbe(store)
    self_store: list[torch.Tensor] = []
    self_probe = _CrossAttnProbe(self_store)
    supervise_self = cfg.self_attn_weight > 0
    unet.set_attn_processor(
        {k: (probe if ".attn2." in k else self_probe if supervise_self and ".attn1." in k else v)
         for k, v in unet.attn_processors.items()}
    )
    pool = _encode_pool(vae, cfg, log) if cfg.data_pool else None
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    rng = np.random.default_rng(cfg.seed + 3)
    alphas = sched.alphas_cumprod.to(cfg.device)
    autocast = dict(device_type=torch.device(cfg.device).type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    history = []
    t0 = time.time()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = learning_rate(cfg, step)
        idx = _batch_seeds(cfg, step)
        if pool is None:
            x, scenes = _images([TRAIN_SEED_OFFSET + i for i in idx], cfg.device, cfg.upright)
            with torch.no_grad():
                post = vae.encode(x).latent_dist
                mean, std = post.mean, post.std
        else:
            scenes = [render_scene(TRAIN_SEED_OFFSET + i, upright=cfg.upright) for i in idx]
            mean, std = pool[0][idx], pool[1][idx]
        z = (mean + std * torch.randn(mean.shape, generator=gen).to(cfg.device)) * sf
        drop = rng.random(cfg.batch) < cfg.caption_dropout
        captions = ["" if d else s.caption for d, s in zip(drop, scenes)]
        ids = _token_ids(tokenizer, captions, cfg.device)
        t = torch.randint(0, 1000, (cfg.batch,), generator=gen)
        noise = torch.randn(z.shape, generator=gen).to(cfg.device)
        keep = t < cfg.attn_max_t  # on the CPU: read per sample
        t = t.to(cfg.device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * noise
        store.clear()
        self_store.clear()
        with torch.autocast(**autocast):
            cond = text_encoder(ids)[0]
            pred = unet(noisy, t, encoder_hidden_states=cond).sample
        per = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))  # (B,)
        mse = per.mean()
        if cfg.min_snr:
            snr = alphas[t] / (1 - alphas[t])
            eps_loss = (per * snr.clamp(max=cfg.min_snr) / snr).mean()
        else:
            eps_loss = mse
        attn = _attention_loss(store, scenes, _token_targets(scenes, captions), keep, cfg.eot_target)
        self_attn = (_self_attention_loss(self_store, scenes, keep, cfg.self_attn_target) if supervise_self
                     else torch.zeros(()))
        loss = eps_loss + cfg.attn_weight * attn + cfg.self_attn_weight * self_attn
        contrast = accuracy = torch.zeros(())
        if cfg.contrast_kinds:
            sub = [i for i in range(cfg.batch) if captions[i]][:cfg.contrast_batch]
            if sub:
                alts = [contrast_captions(captions[i], cfg.contrast_kinds, rng) for i in sub]  # (n, m)
                sidx = torch.tensor(sub, device=cfg.device)
                alt_mse = []
                for r in range(contrast_width(cfg.contrast_kinds)):
                    alt_ids = _token_ids(tokenizer, [a[r] for a in alts], cfg.device)
                    with torch.autocast(**autocast):
                        alt_pred = unet(noisy[sidx], t[sidx], encoder_hidden_states=text_encoder(alt_ids)[0]).sample
                    alt_mse.append(((alt_pred.float() - noise[sidx]) ** 2).mean(dim=(1, 2, 3)))
                contrast, accuracy = contrast_loss(per[sidx], torch.stack(alt_mse, 1), cfg.contrast_tau)
                loss = loss + cfg.contrast_weight * contrast
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            d = cfg.ema if step >= cfg.warmup or cfg.init else 0.0  # a fine-tune's EMA starts at the init
            for e, p in zip(ema, params):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        history.append((mse.item(), attn.item(), self_attn.item(), contrast.item(), accuracy.item()))
        if step % 25 == 0 or step == cfg.steps - 1:
            recent = np.mean(history[-100:], axis=0)
            extra = f" contrast {recent[3]:.3f} acc {recent[4]:.3f}" if cfg.contrast_kinds else ""
            log(f"step {step} mse {recent[0]:.4f} attn {recent[1]:.3f} self {recent[2]:.3f}{extra} "
                f"({time.time() - t0:.0f} s)")
        if (step + 1) % cfg.save_every == 0 or step == cfg.steps - 1:
            _save_pipeline(out / f"step-{step + 1}", unet, text_encoder, vae, tokenizer, params, ema)
    recent = np.mean(history[-100:], axis=0)
    stats = {"unet_seconds": round(time.time() - t0, 1), "final_mse": float(recent[0]), "final_attn": float(recent[1]),
             "final_self_attn": float(recent[2])}
    if cfg.contrast_kinds:
        stats.update(final_contrast=float(recent[3]), final_contrast_accuracy=float(recent[4]))
    return stats


def _save_pipeline(path: Path, unet, text_encoder, vae, tokenizer, params, ema) -> None:
    """Save a StableDiffusionPipeline with the EMA weights (training weights are restored afterwards)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    backup = [p.detach().clone() for p in params]
    procs = unet.attn_processors
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    unet.set_attn_processor(AttnProcessor2_0())
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    unet.set_attn_processor(procs)
    with torch.no_grad():
        for p, b in zip(params, backup):
            p.copy_(b)


def train(out: str | Path, cfg: ToyTrainConfig | None = None, log=print) -> Path:
    """Run both stages into ``out``; the final pipeline is ``out/step-<steps>``. Returns its path."""
    cfg = cfg or ToyTrainConfig()
    check_device(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    try:
        if not cfg.init and not (out / "vae" / "config.json").exists():
            train_vae(out, cfg, log)
        stats = train_unet(out, cfg, log)
    finally:
        torch.set_num_threads(threads)  # the caller's setting, as it was
    stats.update(total_seconds=round(time.time() - t0, 1), config=asdict(cfg))
    (out / "train_log.json").write_text(json.dumps(stats, indent=2), encoding="utf-8")
    log(json.dumps(stats))
    return out / f"step-{cfg.steps}"
