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
    """``nn.Embedding`` look-alike: ids ``< base.num_embeddings`` hit the frozen table, the rest ``vectors``.

    ``columns`` selects this encoder's part of the vectors: a concept's token is one concatenated vector over a
    family's text encoders (768 + 1280 for SDXL, DESIGN §9), and each encoder reads its own columns of it.
    """

    def __init__(self, base: nn.Embedding, vectors: nn.Parameter, columns: slice = slice(None)):
        super().__init__()
        self.base = base
        self.vectors = vectors  # (K, ΣD) float32, trainable
        self.columns = columns
        self.vocab_size = base.num_embeddings
        self.weight = base.weight  # diffusers/transformers code reads `.weight` for dtype and device
        # Optional per-prompt copies (B, K, ΣD): their gradients are the per-prompt gradients of the rows,
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
                spliced = self.vectors[:, self.columns][rows]  # (B, L, D)
            else:
                batch = torch.arange(rows.shape[0], device=rows.device).unsqueeze(1)  # (B, 1)
                spliced = self.batch_vectors[..., self.columns][batch, rows]  # (B, L, D)
            spliced = spliced.to(out.dtype)
            out = torch.where(virtual.unsqueeze(-1), spliced, out)
        return out


class SplicedTokens:
    """The learnable rows spliced into every text encoder of a family (one :class:`SplicedEmbedding` each).

    Setting :attr:`batch_vectors` (per-prompt copies ``(B, K, ΣD)``) hands them to every encoder at once.
    """

    def __init__(self, wrappers: Sequence[SplicedEmbedding]):
        self.wrappers = tuple(wrappers)

    @property
    def batch_vectors(self) -> torch.Tensor | None:
        return self.wrappers[0].batch_vectors

    @batch_vectors.setter
    def batch_vectors(self, value: torch.Tensor | None) -> None:
        for w in self.wrappers:
            w.batch_vectors = value


def encoder_columns(widths: Sequence[int]) -> list[slice]:
    """Column range of each encoder in the concatenated token vector: ``[0:768], [768:2048]`` for SDXL."""
    starts = [sum(widths[:i]) for i in range(len(widths))]
    return [slice(s, s + w) for s, w in zip(starts, widths)]


@contextmanager
def spliced_tokens(text_encoders: nn.Module | Sequence[nn.Module], vectors: nn.Parameter) -> Iterator[SplicedTokens]:
    """Install :class:`SplicedEmbedding` on each of ``text_encoders`` (its columns of ``vectors`` (K, ΣD), in
    encoder order) for the duration of the block, then restore every encoder's own embedding."""
    encoders = [text_encoders] if isinstance(text_encoders, nn.Module) else list(text_encoders)
    bases = [e.get_input_embeddings() for e in encoders]
    if any(isinstance(b, SplicedEmbedding) for b in bases):
        raise RuntimeError("learnable tokens are already spliced into this text encoder")
    widths = [b.embedding_dim for b in bases]
    if sum(widths) != vectors.shape[-1]:
        raise ValueError(f"token vectors are {vectors.shape[-1]} wide but the text encoders take {widths}")
    wrappers = [SplicedEmbedding(b, vectors, cols) for b, cols in zip(bases, encoder_columns(widths))]
    for e, w in zip(encoders, wrappers):
        e.set_input_embeddings(w)
    try:
        yield SplicedTokens(wrappers)
    finally:
        for e, b in zip(encoders, bases):
            e.set_input_embeddings(b)


def _bases(base: nn.Embedding | Sequence[nn.Embedding]) -> list[nn.Embedding]:
    return [base] if isinstance(base, nn.Module) else list(base)


def init_from_vocabulary(
    base: nn.Embedding | Sequence[nn.Embedding], count: int, generator: torch.Generator, exclude: Sequence[int] = ()
) -> torch.Tensor:
    """``count`` rows copied from randomly chosen vocabulary embeddings (paper §3.3: random initialization).

    Rows are drawn without replacement (seeded ``generator``, CPU) among ids not in ``exclude`` (special tokens).
    With several embedding tables (SDXL's two encoders, which share one vocabulary), the same ids are drawn once
    and each row is the concatenation of that id's rows (the initialization acts on the concatenated vector).
    Returns float32 ``(count, ΣD)`` on the first embedding's device.
    """
    bases = _bases(base)
    vocab = min(b.num_embeddings for b in bases)
    allowed = torch.ones(vocab, dtype=torch.bool)
    if exclude:
        allowed[torch.as_tensor([i for i in exclude if i < vocab], dtype=torch.long)] = False
    candidates = allowed.nonzero().squeeze(1)  # (V',)
    if count > candidates.numel():
        raise ConfigError(
            f"cannot initialize {count} learnable tokens from {candidates.numel()} distinct vocabulary rows; "
            "use fewer concepts or fewer split tokens (`split_tokens`)"
        )
    pick = candidates[torch.randperm(candidates.numel(), generator=generator)[:count]]
    device = bases[0].weight.device
    return torch.cat([b.weight.detach()[pick.to(b.weight.device)].float().to(device) for b in bases], -1).clone()


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


def init_from_words(
    base: nn.Embedding | Sequence[nn.Embedding], word_ids: Sequence[int] | Sequence[Sequence[int]], rows_per_word: int = 1
) -> torch.Tensor:
    """Rows copied from the embeddings of ``word_ids`` (Break-A-Scene's / textual inversion's initializer tokens).

    Row ``j·N + i`` (N = number of words) is word i's embedding for every j < ``rows_per_word``: the trainer's
    layout of split token j of concept i. With several embedding tables, ``word_ids`` holds one id list per table
    (each tokenizer's id of the word) and rows are concatenated. Returns float32 ``(rows_per_word·N, ΣD)``.
    """
    bases = _bases(base)
    per_base = [list(word_ids)] if isinstance(base, nn.Module) else [list(ids) for ids in word_ids]
    parts = []
    for b, ids in zip(bases, per_base):
        idx = torch.as_tensor(ids * rows_per_word, dtype=torch.long, device=b.weight.device)
        parts.append(b.weight.detach()[idx].float().to(bases[0].weight.device))
    return torch.cat(parts, -1).clone()


@dataclass(frozen=True)
class Prompt:
    """One training prompt: token ids with virtual ids for the learnable tokens.

    ``input_ids`` (E, L) long, one row per text encoder of the family (they differ in padding only);
    ``slots`` the learnable rows it uses (into the ``(K, ΣD)`` vectors); ``positions`` where each of those rows
    sits in the ids; ``concepts`` the concept index of each slot.
    """

    text: str
    input_ids: torch.Tensor
    slots: tuple[int, ...]
    positions: tuple[int, ...]
    concepts: tuple[int, ...]


class PromptBuilder:
    """Assemble "a photo of [V]" and "a photo of [V1] and … and [VN]" with virtual token ids.

    ``tokenizers`` and ``vocab_sizes``: one per text encoder of the family (a single tokenizer is accepted).
    """

    def __init__(self, tokenizers, vocab_sizes: int | Sequence[int], template: str = "a photo of {}"):
        self.tokenizers = list(tokenizers) if isinstance(tokenizers, list | tuple) else [tokenizers]
        self.vocab_sizes = [vocab_sizes] if isinstance(vocab_sizes, int) else list(vocab_sizes)
        if len(self.tokenizers) != len(self.vocab_sizes):
            raise ValueError("one vocabulary size per tokenizer")
        if template.count("{}") != 1:
            raise ValueError(f"prompt template must contain one '{{}}', got {template!r}")
        self.prefix, self.suffix = template.split("{}")
        self.max_length = self.tokenizers[0].model_max_length

    @staticmethod
    def _words(tok, text: str) -> list[int]:
        text = text.strip()
        return tok(text, add_special_tokens=False).input_ids if text else []

    def _ids(self, tok, vocab_size: int, slots: Sequence[int]) -> tuple[list[int], list[int]]:
        ids = [tok.bos_token_id, *self._words(tok, self.prefix)]
        positions = []
        and_ids = self._words(tok, "and")
        for n, slot in enumerate(slots):
            if n:
                ids += and_ids
            positions.append(len(ids))
            ids.append(vocab_size + slot)
        ids += self._words(tok, self.suffix)
        ids.append(tok.eos_token_id)
        if len(ids) > tok.model_max_length:
            raise ConfigError(
                f"the prompt of {len(slots)} tokens ({len(ids)} text positions) is longer than the text encoder's "
                f"{tok.model_max_length}; use fewer concepts (`n_max`) or fewer split tokens (`split_tokens`)"
            )
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids += [pad] * (tok.model_max_length - len(ids))
        return ids, positions

    def build(self, slots: Sequence[int], concepts: Sequence[int], names: Sequence[str]) -> Prompt:
        """Prompt whose placeholder is the learnable rows ``slots`` joined by "and"."""
        rows, positions = [], None
        for tok, vocab in zip(self.tokenizers, self.vocab_sizes):
            ids, pos = self._ids(tok, vocab, slots)
            if positions is not None and (pos != positions or len(ids) != len(rows[0])):
                raise ConfigError("the family's tokenizers split the prompt differently; cannot align the tokens")
            rows.append(ids)
            positions = pos
        text = (self.prefix + " and ".join(names) + self.suffix).strip()
        return Prompt(text, torch.tensor(rows, dtype=torch.long), tuple(slots), tuple(positions), tuple(concepts))
