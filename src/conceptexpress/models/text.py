"""Prompt tokenization helpers that hold for every SD 1.x / 2.x tokenizer (README, "Models").

SD 1.x tokenizers pad with the end-of-text token, SD 2.x tokenizers with ``!``; positions are therefore read
from the token ids, never from ``argmax`` of the ids (which happens to find the end token in the vocabulary of
the real CLIP tokenizer, where it has the largest id, but not in general) and never hard-coded.
"""

from __future__ import annotations


def tokenize_padded(tokenizer, prompts: list[str]) -> dict:
    # Padded to the full context (77 for CLIP) like the SD pipelines, so positions match what the UNet sees.
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


def eot_index(tokenizer, prompt: str = "") -> int:
    """Position of the end-of-text token ([EOT]) in the padded token ids of ``prompt``.

    The first occurrence of ``tokenizer.eos_token_id``: 1 for the empty prompt (``<|startoftext|>`` comes
    first), ``1 + n`` for a prompt of ``n`` tokens. Correct whether the tokenizer pads with the end token
    (SD 1.x) or with another token (SD 2.x pads with ``!``).

    Raises:
        ValueError: when the tokenizer has no end token or did not place one.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no `eos_token_id`; cannot find [EOT]")
    ids = tokenize_padded(tokenizer, [prompt]).input_ids[0].tolist()
    try:
        return ids.index(eos)
    except ValueError:
        raise ValueError(f"no end-of-text token (id {eos}) in the tokenized prompt {prompt!r}") from None
