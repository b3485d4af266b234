"""A CLIP BPE tokenizer for the toy world: every vocabulary word is one token, anything else falls back to bytes."""

from __future__ import annotations

import json
from pathlib import Path

from .world import COLORS, SHAPES

WORDS: tuple[str, ...] = ("a", "photo", "of", "and", *COLORS, *SHAPES)


def write_toy_tokenizer(path: str | Path, *, model_max_length: int = 77) -> Path:
    """Write a CLIPTokenizer (SD 2.x padding with ``!``) whose merges spell each of :data:`WORDS` as one token."""
    from transformers import CLIPTokenizer

    from ..testing import _bytes_to_unicode

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    merges: list[tuple[str, str]] = []
    # Longest words first: their left-to-right merge chains take precedence over shorter words' pairs.
    for word in sorted(WORDS, key=len, reverse=True):
        if len(word) == 1:
            continue
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        left = parts[0]
        for right in parts[1:]:
            merged = left + right
            if (left, right) not in merges:
                merges.append((left, right))
            vocab.setdefault(merged, len(vocab))
            left = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "!",
                "model_max_length": model_max_length,
            }
        ),
        encoding="utf-8",
    )
    tok = CLIPTokenizer.from_pretrained(path)
    for word in WORDS:
        ids = tok(word, add_special_tokens=False).input_ids
        if len(ids) != 1:  # pragma: no cover - guarded by a test
            raise RuntimeError(f"toy tokenizer spells {word!r} as {len(ids)} tokens")
    tok.save_pretrained(path)
    return path
