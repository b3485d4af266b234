"""Break-A-Scene's second phase (``--method bas-ft``; paper Table 1 "BaS f.t.", Fig. 8): UNet + text encoder.

After the token phase (:class:`~conceptexpress.baselines.bas.BaSTrainer` with the user's masks and initializer
words), Break-A-Scene's ``train.py`` builds one new AdamW optimizer over the UNet and the whole text encoder —
its token embedding table, hence the new tokens, included — at ``--learning_rate 2e-6`` (constant) and trains
``--phase2_train_steps 400`` more steps with the same loss: union sampling, masked ε-MSE, λ·cross-attention MSE.
The gradient of all trained parameters together is clipped to norm 1.0.

:class:`BaSFineTuner` is that phase on a pipeline whose UNet and text encoder are fp32 training copies (see
:func:`training_copy`): the caller's pipeline never changes. The learned token vectors stay spliced rows (as in
the token phase) and train in the same optimizer as the model's weights. Deviations from Break-A-Scene, all
deliberate (docs/fidelity.md, "Break-A-Scene with supervision"):

* no prior preservation (Break-A-Scene generates 100 "a photo at the beach" class images first and adds their
  plain ε-MSE): as in the token phase, where it cannot change the new rows; in this phase it would regularize the
  UNet, so BaS f.t. here may drift further from the base model than Break-A-Scene's;
* master weights fp32 with autocast on CUDA (Break-A-Scene: fp16 mixed precision through accelerate, the same
  arrangement);
* not resumable inside the phase (its state is the whole model and its AdamW moments): ``--resume`` continues
  the token phase from its checkpoint, then runs this phase from its start.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import fields
from typing import TYPE_CHECKING

import torch
from PIL import Image

from ..config import FineTuneConfig, RuntimeConfig, TrainConfig
from .bas import BaSTrainer

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

__all__ = ["BaSFineTuner", "training_copy"]

logger = logging.getLogger(__name__)


def training_copy(pipe: StableDiffusionPipeline, *, text_encoder: bool = True) -> StableDiffusionPipeline:
    """A pipeline sharing ``pipe``'s VAE, tokenizer and scheduler, with fp32 copies of its UNet (and text encoder).

    The copies are what phase 2 trains and what is saved as the run's pipeline; ``pipe`` is left as it was.
    fp32 because AdamW steps of lr 2e-6 vanish in fp16/bf16 weights (Break-A-Scene likewise keeps trained
    weights in fp32 under mixed precision).
    """
    unet = copy.deepcopy(pipe.unet).to(torch.float32)
    encoder = copy.deepcopy(pipe.text_encoder).to(torch.float32) if text_encoder else pipe.text_encoder
    return type(pipe)(**{**pipe.components, "unet": unet, "text_encoder": encoder})


class BaSFineTuner(BaSTrainer):
    """Phase 2 of Break-A-Scene on ``pipe`` (a :func:`training_copy`), starting from the token phase's ``vectors``.

    Built like :class:`BaSTrainer`; ``config`` is the token phase's TrainConfig (seed, flip, weight decay,
    gradient clipping, attention switch), run for ``finetune.finetune_steps`` steps at ``finetune.finetune_lr``.
    Records are marked ``"phase": "finetune"``. Train it with ``checkpoint_dir=None``.
    """

    def __init__(
        self,
        pipe: StableDiffusionPipeline,
        image: Image.Image,
        work_size: tuple[int, int],
        masks: torch.Tensor,
        centroids: torch.Tensor,
        config: TrainConfig,
        *,
        vectors: torch.Tensor,
        finetune: FineTuneConfig | None = None,
        runtime: RuntimeConfig | None = None,
    ):
        self.finetune = ft = finetune or FineTuneConfig()
        runtime = runtime or config.runtime
        # The token phase's words already shaped `vectors`; the seed is offset so that phase 2 does not replay
        # phase 1's draws of subsets, noise and timesteps.
        phase2 = TrainConfig(
            **{**_fields(config), "steps": ft.finetune_steps, "lr": ft.finetune_lr, "seed": (config.seed + 1) % 2**64}
        )
        self._start = vectors.detach().float().cpu()
        super().__init__(pipe, image, work_size, masks, centroids, phase2, runtime=runtime)
        # Break-A-Scene: requires_grad_(True) on the UNet and text encoder, one AdamW over all their parameters
        # (the embedding table included) — collected before the token rows are spliced into the text encoder.
        modules = [pipe.unet, *([pipe.text_encoder] if ft.finetune_text_encoder else [])]
        self.model_params = [p for m in modules for p in m.parameters()]
        for p in self.model_params:
            p.requires_grad_(True)
        self.optimizer = torch.optim.AdamW(
            [self.vectors, *self.model_params], lr=ft.finetune_lr, betas=(0.9, 0.999), eps=1e-8,
            weight_decay=self.config.weight_decay,
        )

    def _initial_vectors(self, bases, toks) -> torch.Tensor:
        width = sum(b.embedding_dim for b in bases)
        if self._start.shape != (self.n, width):
            raise ValueError(f"`vectors` must be ({self.n}, {width}), got {tuple(self._start.shape)}")
        return self._start.clone()

    def train(self, checkpoint_dir=None, resume: bool = False, callbacks=()):
        if checkpoint_dir is not None or resume:
            raise ValueError("the fine-tuning phase keeps no checkpoints: train it with checkpoint_dir=None")
        self.pipe.unet.train()
        self.pipe.text_encoder.train(self.finetune.finetune_text_encoder)
        try:
            return super().train(callbacks=callbacks)
        finally:
            self.pipe.unet.eval()
            self.pipe.text_encoder.eval()
            for p in self.model_params:
                p.requires_grad_(False)
                p.grad = None

    def train_step(self):
        record = super().train_step()
        record["phase"] = "finetune"
        return record

    def _apply(self, grad: torch.Tensor) -> float:
        """One AdamW step on the token rows (gradient ``grad``) and the model's weights (their ``.grad``, filled by
        the step's backward pass), all clipped together to ``max_grad_norm`` as Break-A-Scene clips them."""
        self.vectors.grad = grad.to(self.vectors.dtype)
        params = [self.vectors, *(p for p in self.model_params if p.grad is not None)]
        limit = self.config.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, limit if limit > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_steps += 1
        return float(norm)

    def _unscale(self, per_prompt: torch.Tensor) -> bool:
        # The parent unscales every parameter of the optimizer (model weights included) and decides on the token
        # rows; an overflow in the model's gradients skips the step as well, and a skipped step's gradients go.
        skip = super()._unscale(per_prompt)
        if self.scaler.is_enabled() and not skip:
            skip = not all(bool(torch.isfinite(p.grad).all()) for p in self.model_params if p.grad is not None)
            if skip:
                self.skipped_steps += 1
        if skip:
            for p in self.model_params:
                p.grad = None
        return skip

    def _make_fingerprint(self, image: Image.Image) -> str:
        return "finetune"  # never checkpointed


def _fields(config: TrainConfig) -> dict:
    return {f.name: getattr(config, f.name) for f in fields(config)}
