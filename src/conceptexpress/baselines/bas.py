"""BaS†: the Break-A-Scene baseline adapted to the unsupervised setting (paper §4.1; docs/fidelity.md, "Baseline BaS†").

Break-A-Scene (Avrahami et al., SIGGRAPH Asia 2023) learns one token per annotated object from one image, in two
phases: tokens only ("textual inversion" phase), then tokens + UNet. The paper's BaS† keeps its first phase only
and removes the supervision ConceptExpress does not have:

* **tokens only** — UNet and text encoder frozen, no prior-preservation images;
* **random initialization** — no initializer words: each token starts from a random vocabulary row (seeded,
  the same draw :class:`~conceptexpress.learn.trainer.TokenTrainer` makes);
* **our masks** — the localization's instance masks m_i stand in for the annotated ones;
* **same schedule** — ``TrainConfig.steps``, ``lr``, AdamW settings, flip and seed as ConceptExpress; one
  token per concept from the start (no split-and-merge, no contrastive loss, no EMD alignment).

The same trainer runs ``--method bas`` / ``bas-ft`` (paper Table 1 grey rows, Fig. 8): Break-A-Scene's token phase
with the user's masks and/or initializer words (``TrainConfig.init_words``, which replaces the random draw); the
deviations below hold for it too, except initialization. ``bas-ft``'s second phase is
:mod:`conceptexpress.baselines.bas_ft`.

One step, in order (Break-A-Scene's ``train.py``, ``DreamBoothDataset.__getitem__`` and the training loop):

1. **union sampling** — draw k uniformly in 1..N, then k distinct concepts in random order
   (:func:`sample_union`); the prompt is "a photo of [V_a] and [V_b] …" in that order, the mask their union;
2. **masked denoising** — ε-MSE inside the union mask, mean over all latent elements (our Eq. 8,
   :func:`conceptexpress.learn.losses.masked_denoising_loss`; Break-A-Scene's ``apply_masked_loss``);
3. **cross-attention loss** — for every token of the prompt: its cross-attention map at latent/4 (heads and the
   down/up layers of that resolution averaged), divided by its maximum, against the concept's mask
   nearest-downsampled to that size; per-token MSE (mean over pixels), summed over the prompt's tokens,
   weighted by λ = 1e-2 (``--lambda_attention``) — :func:`attention_mse`;
4. one AdamW step on the N token rows (one prompt = one UNet sample per step).

Deviations from Break-A-Scene's code, all deliberate:

* initialization: its "random" initialization copies the fixed rows ``[-3N:-2N]`` of the resized embedding
  matrix (the last BPE merges, the same for every image); here a seeded random draw of vocabulary rows, which is
  what paper §4.1 describes and what ConceptExpress uses, so both methods start from the same kind of vectors;
* masks: Break-A-Scene nearest-downsamples full-resolution masks (512² → 64² for the loss, → 16² for the
  attention term); ours are the localization's latent-resolution masks, used as they are for the loss and
  nearest-downsampled (``F.interpolate`` default mode, as Break-A-Scene) for the attention term;
* heads: Break-A-Scene's attention store keeps the second half of the (batch · heads) axis, i.e. all heads of
  the instance sample when prior preservation puts a class image first (its default). Without prior
  preservation its code keeps only half of the heads and then indexes a prompt that does not exist
  (google/break-a-scene PR #34). We average all heads: its default behaviour, minus the class image;
* prior preservation: off. In the token phase it cannot change the new rows' gradient (the class prompt has no
  new token); it only adds frozen-row gradients to the norm that is clipped;
* gradient clipping: Break-A-Scene clips the embedding-matrix gradient to norm 1.0, a norm that includes the
  gradients of the frozen prompt words, which our spliced rows never compute. Here the token rows' gradient is
  clipped to ``TrainConfig.max_grad_norm`` (1.0), as for ConceptExpress;
* t, noise, flip and the VAE posterior sample come from the trainer's seeded CPU generator (Break-A-Scene uses
  the global RNGs), so runs are reproducible and ``--resume`` continues bit-for-bit;
* λ weights the attention term in the logged loss exactly as in Break-A-Scene (``loss = mse + λ·attn``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image

from ..config import RuntimeConfig, TrainConfig
from ..errors import ConfigError
from ..learn.tokens import Prompt
from ..learn.trainer import TokenTrainer

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = ["BaSTrainer", "LAMBDA_ATTENTION", "attention_mse", "sample_union"]

# Break-A-Scene's ``--lambda_attention`` default.
LAMBDA_ATTENTION = 1e-2


def sample_union(num_concepts: int, generator: torch.Generator) -> list[int]:
    """Break-A-Scene's token subset of one step: k ~ U{1..N}, then k distinct concepts in random order.

    Not uniform over the 2^N − 1 subsets: every size k is equally likely (a one-token prompt has probability
    1/N, the all-N prompt too). The order is the prompt's token order.

    Args:
        num_concepts: N ≥ 1.
        generator: CPU generator; exactly two draws (``randint`` then ``randperm``) per call.

    Returns:
        k concept indices in ``[0, N)``, distinct, in sampled order.
    """
    if num_concepts < 1:
        raise ValueError(f"`num_concepts` must be >= 1, got {num_concepts}")
    k = int(torch.randint(1, num_concepts + 1, (), generator=generator))
    return torch.randperm(num_concepts, generator=generator)[:k].tolist()


def attention_mse(maps: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Break-A-Scene's cross-attention loss of one token: MSE(mask, map / max(map)), mean over pixels.

    Args:
        maps: (B, h, w) cross-attention probabilities of each token (non-negative; typically with gradient).
        targets: (B, h, w) the token's concept mask at the same size, values in {0, 1}.

    Returns:
        (B,) float32 (float64 for float64 ``maps``); differentiable w.r.t. ``maps``, through the max as well.
    """
    if maps.ndim != 3 or targets.shape != maps.shape:
        raise ValueError(
            f"`maps` must be (B, h, w) and `targets` the same shape, got {tuple(maps.shape)} and {tuple(targets.shape)}"
        )
    dtype = torch.float64 if maps.dtype == torch.float64 else torch.float32
    a = maps.to(dtype)
    # Softmax probabilities are > 0, so the max is too; the clamp only guards against underflowed maps.
    peak = a.flatten(1).amax(1).clamp_min(torch.finfo(dtype).tiny).view(-1, 1, 1)  # (B, 1, 1)
    return (targets.to(a.device, dtype) - a / peak).square().mean(dim=(1, 2))  # (B,)


class BaSTrainer(TokenTrainer):
    """The BaS† baseline (module docstring): one token per concept, union sampling, masked + attention loss.

    Built like :class:`TokenTrainer` (same arguments, same outputs, checkpoints and ``--resume``). The given
    ``config`` is used with ``split_merge=False`` and ``contrastive=False`` forced (``self.config`` is that
    derived config); ``attn_reg=False`` switches the attention term off, as it switches EMD off for ConceptExpress.

    Args:
        pipe, image, work_size, masks, centroids, config: as :class:`TokenTrainer` (centroids are unused by the
            losses; they only enter the checkpoint fingerprint).
        lambda_attention: weight λ of the cross-attention loss; default :data:`LAMBDA_ATTENTION` (1e-2).
    """

    lambda_attention: float = LAMBDA_ATTENTION

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
        lambda_attention: float | None = None,
    ):
        if lambda_attention is not None:
            if not lambda_attention >= 0:
                raise ConfigError(f"`lambda_attention` must be >= 0, got {lambda_attention!r}")
            self.lambda_attention = float(lambda_attention)
        config = config or TrainConfig()
        runtime = runtime or config.runtime  # dataclasses.replace would drop it (not a field)
        config = dataclasses.replace(config, split_merge=False, contrastive=False)
        self._step_prompt: Prompt | None = None
        self._prompt_cache: dict[tuple[int, ...], Prompt] = {}
        # The fingerprint (computed in super().__init__) reads lambda_attention, so it is set first.
        super().__init__(pipe, image, work_size, masks, centroids, config, runtime=runtime)
        assert self.g == 1, "BaS† learns one token per concept"

    # ------------------------------------------------------------------ prompts
    @property
    def merged(self) -> bool:
        # One token per concept from the first step: the trainer's "merged" layout; keeps split-phase terms off.
        return True

    def union_prompt(self, concepts: list[int] | tuple[int, ...]) -> Prompt:
        """The prompt "a photo of [V_a] and [V_b] …" for ``concepts`` in that order (row i = concept i: g = 1)."""
        key = tuple(int(c) for c in concepts)
        prompt = self._prompt_cache.get(key)
        if prompt is None:
            # Built on demand: there are Σ_k N!/(N−k)! ordered subsets, but at most one new one per step.
            prompt = self.builder.build(list(key), list(key), [f"<c{c + 1}>" for c in key])
            self._prompt_cache[key] = prompt
        return prompt

    def prompts(self) -> list[Prompt]:
        """The step's single union prompt.

        Inside :meth:`train_step` this is the prompt drawn for the step. Called between steps it previews the
        prompt the next step will draw, without consuming the generator (so resume stays exact).
        """
        if self._step_prompt is not None:
            return [self._step_prompt]
        state = self.generator.get_state()
        try:
            return [self.union_prompt(sample_union(self.n, self.generator))]
        finally:
            self.generator.set_state(state)

    def train_step(self) -> dict[str, Any]:
        # The subset is drawn here, once per step and before the step's other random draws, from the trainer's
        # CPU generator: its state is checkpointed, so a resumed run draws the same subsets.
        self._step_prompt = prompt = self.union_prompt(sample_union(self.n, self.generator))
        try:
            record = super().train_step()
        finally:
            self._step_prompt = None
        record["phase"] = "union"
        record["concepts"] = list(prompt.concepts)
        return record

    # ------------------------------------------------------------------ losses
    @property
    def attention_weight(self) -> float:
        """λ of Break-A-Scene's cross-attention loss (``--lambda_attention``, 1e-2)."""
        return self.lambda_attention

    def attention_loss(
        self, maps: torch.Tensor, prompts: list[Prompt], masks: torch.Tensor, centroids: torch.Tensor
    ) -> torch.Tensor:
        """Σ over each prompt's tokens of :func:`attention_mse` against the token's concept mask.

        ``maps`` (b, width, h4, w4): slot s of prompt r at ``maps[r, s]`` (slots past a prompt's length are
        padding); ``masks`` (N, h, w) bool, already flipped with the step; ``centroids`` unused. Returns (b,).
        """
        hw = (int(maps.shape[-2]), int(maps.shape[-1]))
        # Break-A-Scene: F.interpolate(mask, size=(16, 16)), default mode "nearest".
        small = F.interpolate(masks.unsqueeze(1).float(), size=hw, mode="nearest").squeeze(1)  # (N, h4, w4)
        small = small.to(maps.device)
        pairs = [(r, s, c) for r, p in enumerate(prompts) for s, c in enumerate(p.concepts)]
        per_token = attention_mse(
            torch.stack([maps[r, s] for r, s, _ in pairs]),  # (P, h4, w4)
            torch.stack([small[c] for _, _, c in pairs]),
        )  # (P,)
        rows = torch.tensor([r for r, _, _ in pairs], device=maps.device)
        return torch.zeros(len(prompts), device=maps.device, dtype=per_token.dtype).index_add(0, rows, per_token)

    # ------------------------------------------------------------------ checkpoints
    def _make_fingerprint(self, image: Image.Image) -> str:
        # A ConceptExpress run with --no-split-merge --no-contrastive has the same TrainConfig: the method and λ
        # must be part of the fingerprint so --resume never continues the other method's checkpoint.
        base = super()._make_fingerprint(image)
        return hashlib.sha256(f"{base}|bas-dagger|{self.lambda_attention!r}".encode()).hexdigest()[:16]
