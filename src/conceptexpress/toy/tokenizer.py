"""A CLIP BPE tokenizer for the toy world: every vocabulary word is one token, anything else falls back to bytes."""

from __future__ import annotations

from pathlib import Path

from .world import COLORS, SHAPES

WORDS: tuple[str, ...] = ("a", "photo", "of", "and", *COLORS, *SHAPES)


def write_toy_tokenizer(path: str | Path, *, model_max_length: int = 77) -> Path:
    """Write a CLIPTokenizer (SD 2.x padding with ``!``) whose merges spell each of :data:`WORDS` as one token."""
    from transformers import CLIPTokenizer

    from ..models.tokenizer_files import write_clip_tokenizer

    path = write_clip_tokenizer(path, pad_style="sd2", model_max_length=model_max_length, words=WORDS)
    tok = CLIPTokenizer.from_pretrained(path)
    for word in WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:  # pragma: no cover - guarded by a test
            raise RuntimeError(f"toy tokenizer spells {word!r} as {len(ids)} tokens")
    return path
