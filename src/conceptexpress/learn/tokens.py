"""The token lookup table (paper Eq. 7, 9): learnable vectors spliced into the text encoder's input.

New tokens never enter the tokenizer or the text encoder's weights during training. Prompts are assembled
from token ids in which each learnable token is a *virtual id* ``vocab_size + k``; a thin wrapper around the
frozen input-embedding module looks those ids up in one trainable ``(K, D)`` parameter. Every row of the
model's own embedding matrix therefore stays bit-for-bit unchanged (paper §3.3: only the new tokens are learned), and the
user's pipeline is left exactly as it was when the wrapper is removed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError


class SplicedEmbedding(nn.Module):
    """``nn.Embedding`` look-alike: ids ``< base.num_embeddings`` hit the frozen table, the rest ``vectors``."""

    def __init__(self, base: nn.Embedding, vectors: nn.Parameter):
        super().__init__()
        self.base = base
        self.vectors = vectors  # (K, D) float32, trainable
        self.vocab_size = base.num_embeddings
        self.weight = base.weight  # diffusers/transformers code reads `.weight` for dtype and device
        # Optional per-prompt copies (B, K, D): their gradients are the per-prompt gradients of the rows,
        # which the trainer sums (one optimizer step) or replays prompt by prompt (released update rule).
        self.batch_vectors: torch.Tensor | None = None

    @property
    def num_embeddings(self) -> int:
        return self.vocab_size + self.vectors.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        virtual = input_ids >= self.vocab_size  # (B, L)
        out = self.base(input_ids.clamp(max=self.vocab_size - 1))  # (B, L, D)
        if virtual.any():
            rows = (input_ids - self.vocab_size).clamp(min=0)  # (B, L)
            if self.batch_vectors is None:
                spliced = self.vectors[rows]  # (B, L, D)
            else:
                batch = torch.arange(rows.shape[0], device=rows.device).unsqueeze(1)  # (B, 1)
                spliced = self.batch_vectors[batch, rows]  # (B, L, D)
            spliced = spliced.to(out.dtype)
            out = torch.where(virtual.unsqueeze(-1), spliced, out)
        return out


@contextmanager
def spliced_tokens(text_encoder, vectors: nn.Parameter) -> Iterator[SplicedEmbedding]:
    """Install :class:`SplicedEmbedding` on ``text_encoder`` for the duration of the block, then restore."""
    base = text_encoder.get_input_embeddings()
    if isinstance(base, SplicedEmbedding):
        raise RuntimeError("learnable tokens are already spliced into this text encoder")
    wrapper = SplicedEmbedding(base, vectors)
    text_encoder.set_input_embeddings(wrapper)
    try:
        yield wrapper
    finally:
        text_encoder.set_input_embeddings(base)


def init_from_vocabulary(base: nn.Embedding, count: int, generator: torch.Generator, exclude: Sequence[int] = ()) -> torch.Tensor:
    """``count`` rows copied from randomly chosen vocabulary embeddings (paper §3.3: random initialization).

    Rows are drawn without replacement (seeded ``generator``, CPU) among ids not in ``exclude`` (special tokens).
    Returns float32 ``(count, D)`` on the embedding's device.
    """
    vocab = base.num_embeddings
    allowed = torch.ones(vocab, dtype=torch.bool)
    if exclude:
        allowed[torch.as_tensor(list(exclude), dtype=torch.long)] = False
    candidates = allowed.nonzero().squeeze(1)  # (V',)
    if count > candidates.numel():
        raise ConfigError(
            f"cannot initialize {count} learnable tokens from {candidates.numel()} distinct vocabulary rows; "
            "use fewer concepts or fewer split tokens (`split_tokens`)"
        )
    pick = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
    return base.weight.detach()[pick.to(base.weight.device)].float().clone()


def word_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The vocabulary id of each initializer word; every word must be exactly one token of ``tokenizer``.

    Textual inversion (diffusers' ``train_textual_inversion.py``) refuses a multi-token initializer; Break-A-Scene
    silently takes its first piece. Here it is an error that shows the pieces, so "saucer" never quietly becomes
    "sau".
    """
    ids = []
    for word in words:
        pieces = tokenizer(word, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            shown = " ".join(tokenizer.convert_ids_to_tokens(pieces))
            raise ConfigError(
                f"`init_words`: {word!r} is {len(pieces)} tokens of this model's tokenizer ({shown}); "
                "choose a word that is a single token (a more common synonym)"
            )
        ids.append(int(pieces[0]))
    return ids


def init_from_words(base: nn.Embedding, word_ids: Sequence[int], rows_per_word: int = 1) -> torch.Tensor:
    """Rows copied from the embeddings of ``word_ids`` (Break-A-Scene's / textual inversion's initializer tokens).

    Row ``j·N + i`` (N = ``len(word_ids)``) is word i's embedding for every j < ``rows_per_word``: the trainer's
    layout of split token j of concept i. Returns float32 ``(rows_per_word·N, D)`` on the embedding's device.
    """
    ids = torch.as_tensor(list(word_ids) * rows_per_word, dtype=torch.long, device=base.weight.device)
    return base.weight.detach()[ids].float().clone()


@dataclass(frozen=True)
class Prompt:
    """One training prompt: token ids with virtual ids for the learnable tokens.

    ``input_ids`` (L,) long; ``slots`` the learnable rows it uses (into the ``(K, D)`` vectors);
    ``positions`` where each of those rows sits in ``input_ids``; ``concepts`` the concept index of each slot.
    """

    text: str
    input_ids: torch.Tensor
    slots: tuple[int, ...]
    positions: tuple[int, ...]
    concepts: tuple[int, ...]


class PromptBuilder:
    """Assemble "a photo of [V]" and "a photo of [V1] and … and [VN]" with virtual token ids."""

    def __init__(self, tokenizer, vocab_size: int, template: str = "a photo of {}"):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        if template.count("{}") != 1:
            raise ValueError(f"prompt template must contain one '{{}}', got {template!r}")
        self.prefix, self.suffix = template.split("{}")
        self.max_length = tokenizer.model_max_length

    def _words(self, text: str) -> list[int]:
        text = text.strip()
        return self.tokenizer(text, add_special_tokens=False).input_ids if text else []

    def build(self, slots: Sequence[int], concepts: Sequence[int], names: Sequence[str]) -> Prompt:
        """Prompt whose placeholder is the learnable rows ``slots`` joined by "and"."""
        tok = self.tokenizer
        ids = [tok.bos_token_id, *self._words(self.prefix)]
        positions = []
        and_ids = self._words("and")
        for n, slot in enumerate(slots):
            if n:
                ids += and_ids
            positions.append(len(ids))
            ids.append(self.vocab_size + slot)
        ids += self._words(self.suffix)
        ids.append(tok.eos_token_id)
        if len(ids) > self.max_length:
            raise ConfigError(
                f"the prompt of {len(slots)} tokens ({len(ids)} text positions) is longer than the text encoder's "
                f"{self.max_length}; use fewer concepts (`n_max`) or fewer split tokens (`split_tokens`)"
            )
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids += [pad] * (self.max_length - len(ids))
        text = (self.prefix + " and ".join(names) + self.suffix).strip()
        return Prompt(text, torch.tensor(ids, dtype=torch.long), tuple(slots), tuple(positions), tuple(concepts))
