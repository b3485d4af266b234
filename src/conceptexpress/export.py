"""Learned tokens on disk: one diffusers file and one A1111 / ComfyUI file per token.

Reading them back (manifest, embeddings, loading into a pipeline) is :mod:`conceptexpress.io.run_folder`.
Layout inside a run folder (README, "Outputs")::

    RUN/concepts/<stem>.safetensors   {"<c1>": (V, D) float32}   diffusers textual-inversion format
    RUN/a1111/<stem>.safetensors      {"emb_params": (V, D) float32}   A1111 WebUI / ComfyUI embedding
    RUN/manifest.json                 lists the tokens and both files; ``"complete": true`` written last

``V`` is the number of vectors per token (1 in the paper) and ``D`` the text encoder's width (1024 for SD 2.x,
768 for SD 1.x). What the three clients read, checked against their sources:

- diffusers ``load_textual_inversion``: a state dict with exactly one key is taken as ``{token: embedding}``;
  shapes ``(D,)`` and ``(V, D)`` both load (``V > 1`` becomes ``token, token_1, …``). The diffusers training
  example saves ``{placeholder: (V, D)}``, which is what is written here.
- A1111 WebUI (``create_embedding_from_data``): a ``.safetensors`` file is read with safetensors; a dict with a
  single tensor is accepted whatever its key, and the trigger word is the file's stem.
- ComfyUI (``comfy/sd1_clip.load_embed``): reads ``.safetensors`` with safetensors and, lacking
  ``string_to_param`` or a ``clip_l``/``clip_g`` key, takes the first tensor; prompted as ``embedding:<stem>``.
  ``emb_params`` is the key kohya-ss sd-scripts writes for SD 1.x / 2.x embeddings.

Everything is safetensors: nothing here calls ``torch.load`` (pickles can run code), and every write is
atomic, so an interrupted export never leaves a half file.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors

from .io.atomic import atomic_write_bytes
from .io.run_folder import A1111_DIR, A1111_KEY, CONCEPTS_DIR

__all__ = ["token_stem", "write_token_files"]

# Characters a file name may not contain on Windows (the strictest of the three systems), plus path separators.
_UNSAFE = re.compile(r'[<>:"/\\|?*\x00-\x1f\x7f\s]')
# Device names Windows refuses as file stems, whatever the extension.
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


# ----------------------------------------------------------------------------- names
def token_stem(token: str) -> str:
    """File stem for ``token``: ``"<c1>"`` → ``"c1"``.

    Removes the angle brackets and every character that is unsafe in a file name on Windows, macOS or Linux
    (``<>:"/\\|?*``, control characters, whitespace), strips leading/trailing dots, and suffixes ``_`` to
    Windows device names (``con``, ``nul``, ``com1``, …). The stem is also the trigger word in A1111 / ComfyUI.

    Raises:
        ValueError: nothing usable is left (e.g. ``"<>"`` or ``"<..>"``).
    """
    stem = _UNSAFE.sub("", token).strip(".")
    if not stem:
        raise ValueError(f"token {token!r} leaves no usable file name once unsafe characters are removed")
    if stem.lower().split(".")[0] in _WINDOWS_RESERVED:
        stem += "_"
    return stem


def _check_tokens(tokens: list[str]) -> list[str]:
    """Validate the token strings and return their file stems (unique even on case-insensitive file systems)."""
    stems: dict[str, str] = {}
    out = []
    for token in tokens:
        if not isinstance(token, str) or not token or token != token.strip() or any(c.isspace() for c in token):
            # The tokenizer would split a token with whitespace into several words.
            raise ValueError(f"`tokens` must be non-empty strings without whitespace, got {token!r}")
        stem = token_stem(token)
        key = stem.casefold()  # macOS and Windows file systems are case-insensitive by default
        if key in stems:
            raise ValueError(
                f"tokens {stems[key]!r} and {token!r} map to the same file name {stem!r}.safetensors; rename one"
            )
        stems[key] = token
        out.append(stem)
    return out


# ----------------------------------------------------------------------------- writing
def write_token_files(out_dir: str | Path, tokens: list[str], embeddings: torch.Tensor) -> list[dict[str, Any]]:
    """Write both files of every token under ``out_dir`` and return their manifest entries.

    Args:
        out_dir: the run folder; ``concepts/`` and ``a1111/`` are created inside it.
        tokens: placeholder strings, e.g. ``["<c1>", "<c2>"]``, one per concept.
        embeddings: ``(N, D)`` (one vector per token) or ``(N, V, D)`` float tensor, any device and dtype;
            stored as float32 on CPU, shape ``(V, D)`` per token in both files.

    Returns:
        One dict per token, in order: ``{"token", "index", "file", "a1111_file", "sha256", "a1111_sha256"}``,
        file paths relative to ``out_dir`` with ``/`` separators, SHA-256 of each file's bytes (the ``tokens``
        entries of ``manifest.json``).

    Raises:
        ValueError: tokens and embeddings disagree in number, a token is empty or has whitespace, two tokens map
            to the same file name, or an embedding is not finite.
        OutputError: a file cannot be written.
    """
    stems = _check_tokens(list(tokens))
    if embeddings.ndim == 2:
        embeddings = embeddings[:, None, :]  # (N, 1, D)
    if embeddings.ndim != 3 or embeddings.shape[0] != len(tokens):
        raise ValueError(
            f"`embeddings` must be (N, D) or (N, V, D) with N = {len(tokens)} tokens, got shape {tuple(embeddings.shape)}"
        )
    embeddings = embeddings.detach().to("cpu", torch.float32)
    if not torch.isfinite(embeddings).all():
        bad = [t for t, e in zip(tokens, embeddings) if not torch.isfinite(e).all()]
        raise ValueError(f"embeddings of {bad} contain NaN or infinity; refusing to export them")

    out = Path(out_dir)
    (out / CONCEPTS_DIR).mkdir(parents=True, exist_ok=True)
    (out / A1111_DIR).mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (token, stem, emb) in enumerate(zip(tokens, stems, embeddings)):
        emb = emb.contiguous().clone()  # (V, D); safetensors refuses views that share storage
        file = f"{CONCEPTS_DIR}/{stem}.safetensors"
        a1111_file = f"{A1111_DIR}/{stem}.safetensors"
        meta = {"format": "pt", "token": token, "num_vectors": str(emb.shape[0])}
        data = save_tensors({token: emb}, metadata=meta)
        a1111_data = save_tensors({A1111_KEY: emb}, metadata={**meta, "name": stem})
        atomic_write_bytes(out / file, data)
        atomic_write_bytes(out / a1111_file, a1111_data)
        entries.append({"token": token, "index": i, "file": file, "a1111_file": a1111_file,
                        # checked when the run is read back (io.run_folder.read_token_embeddings)
                        "sha256": hashlib.sha256(data).hexdigest(), "a1111_sha256": hashlib.sha256(a1111_data).hexdigest()})
    return entries
