"""A working CLIP BPE tokenizer generated on the fly (no download), for the random test pipelines."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

# SD 2.x tokenizers pad with "!"; SD 1.x tokenizers pad with the end-of-text token (README, "Models").
PAD_STYLES = ("sd2", "sd1")


def _bytes_to_unicode() -> dict[int, str]:
    # The reversible byte -> printable-unicode table of GPT-2/CLIP byte-level BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_clip_tokenizer(
    path: str | Path, *, pad_style: str = "sd2", model_max_length: int = 77, words: tuple[str, ...] = ()
) -> Path:
    """Write a working CLIP BPE tokenizer (vocab.json, merges.txt, configs) to ``path``.

    The vocabulary holds every byte symbol, its end-of-word form ``x</w>``, and the two special tokens
    (512 + 2 ids), so any text tokenizes, one id per character. ``pad_style="sd2"`` pads with ``!``,
    ``"sd1"`` pads with ``<|endoftext|>`` like SD 1.x. ``words`` get left-to-right merge chains (and their
    intermediate symbols, before the special tokens) so that each is one token; longer words' merges rank first.
    """
    if pad_style not in PAD_STYLES:
        raise ValueError(f"`pad_style` must be one of {PAD_STYLES}, got {pad_style!r}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    symbols = list(_bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    merges: list[tuple[str, str]] = []
    for word in sorted(words, key=len, reverse=True):
        if len(word) < 2:
            continue
        left = word[0]
        for right in [*word[1:-1], word[-1] + "</w>"]:
            if (left, right) not in merges:
                merges.append((left, right))
            vocab.setdefault(left + right, len(vocab))
            left += right
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    pad = "!" if pad_style == "sd2" else "<|endoftext|>"
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": pad,
                "model_max_length": model_max_length,
            }
        ),
        encoding="utf-8",
    )
    # Loading from vocab.json + merges.txt works on transformers 4.x (slow/fast) and 5.x alike.
    tok = CLIPTokenizer.from_pretrained(path)
    tok.save_pretrained(path)
    return path
