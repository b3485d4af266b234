"""Learned tokens on disk — the one place for token file formats: writing them, and reading one back.

Loading a run's tokens into a pipeline is :mod:`conceptexpress.embeddings`. Layout inside a run folder
(README, "Outputs"), per model family (:attr:`ModelFamily.export_keys <conceptexpress.models.family.ModelFamily>`)::

    SD 1.x / 2.x (one text encoder, keys ("emb_params",)):
    RUN/concepts/<stem>.safetensors   {"<c1>": (V, D) float32}          diffusers textual-inversion format
    RUN/a1111/<stem>.safetensors      {"emb_params": (V, D) float32}    A1111 WebUI / ComfyUI / kohya embedding

    SDXL (two text encoders, keys ("clip_l", "clip_g")):
    RUN/concepts/<stem>.safetensors   {"clip_l": (V, 768), "clip_g": (V, 1280)} float32   the only file

    RUN/manifest.json                 lists the tokens and their files; ``"complete": true`` written last

``V`` is the number of vectors per token (1 in the paper) and ``D`` the text encoder's width (1024 for SD 2.x,
768 for SD 1.x). In memory an SDXL token is one concatenated vector ``(V, 768 + 1280)`` (encoder order, as it
is trained); the file splits it by encoder. What the clients read, checked against their sources:

- diffusers ``load_textual_inversion``: a state dict with exactly one key is taken as ``{token: embedding}``;
  shapes ``(D,)`` and ``(V, D)`` both load (``V > 1`` becomes ``token, token_1, …``). The diffusers training
  example saves ``{placeholder: (V, D)}``, which is what is written for SD 1.x / 2.x. diffusers has no SDXL
  single-file format (its SDXL script writes one file per encoder, which A1111 / ComfyUI cannot read) and does
  not read the ``{clip_l, clip_g}`` file either: it is loaded with two calls, one per encoder, each given its
  half and ``token=`` (docs/sdxl-tokens.md; :mod:`conceptexpress.embeddings` does exactly that).
- A1111 WebUI (``create_embedding_from_data``): a ``.safetensors`` file is read with safetensors; a dict with a
  single tensor is accepted whatever its key, a dict with ``clip_l`` and ``clip_g`` is an SDXL embedding; the
  trigger word is the file's stem.
- ComfyUI (``comfy/sd1_clip.load_embed``): reads ``.safetensors`` with safetensors; each CLIP model takes its
  own key (``clip_l`` / ``clip_g``) when present, else the first tensor; prompted as ``embedding:<stem>``.
- kohya-ss sd-scripts writes ``emb_params`` for SD 1.x / 2.x embeddings and ``clip_l`` / ``clip_g`` for SDXL.

So an SDXL run writes its one ``{clip_l, clip_g}`` file once, in ``concepts/``; its manifest entry's
``a1111_file`` names that same file (and ``a1111_sha256`` is its hash): every entry keeps both keys, meaning
"the file conceptexpress reads" and "the file to copy into A1111 / ComfyUI", which for SDXL coincide.

Everything is safetensors: nothing here calls ``torch.load`` (pickles can run code), and every write is
atomic, so an interrupted export never leaves a half file.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors

from .errors import RunFolderError
from .io.atomic import atomic_write_bytes
from .io.checked import read_safetensors_checked
from .io.run_folder import A1111_KEY, RunFolder
from .models.family import FAMILIES

__all__ = ["read_token_file", "split_embedding", "token_stem", "write_token_files"]

# Multi-encoder files, by their key set: the keys in encoder (= context) order, e.g. ("clip_l", "clip_g").
_MULTI_KEYS = {frozenset(f.export_keys): f.export_keys for f in FAMILIES.values() if len(f.export_keys) > 1}

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


# ----------------------------------------------------------------------------- vectors per encoder
def split_embedding(embedding: torch.Tensor, dims: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """Split ``(..., sum(dims))`` — a token's vectors concatenated in encoder order — into one
    ``(..., dims[k])`` view per text encoder (``dims`` from :meth:`ModelFamily.embedding_dims`).

    Raises:
        ValueError: the last dimension is not ``sum(dims)``.
    """
    dims = tuple(int(d) for d in dims)
    if embedding.shape[-1] != sum(dims):
        raise ValueError(
            f"embedding width {embedding.shape[-1]} is not the text encoders' {' + '.join(map(str, dims))} = {sum(dims)}"
        )
    return tuple(torch.split(embedding, dims, dim=-1))


# ----------------------------------------------------------------------------- writing
def write_token_files(
    out_dir: str | Path,
    tokens: list[str],
    embeddings: torch.Tensor,
    *,
    keys: Sequence[str] | None = None,
    dims: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Write the file(s) of every token under ``out_dir`` and return their manifest entries.

    Args:
        out_dir: the run folder; ``concepts/`` (and, for one text encoder, ``a1111/``) are created inside it.
        tokens: placeholder strings, e.g. ``["<c1>", "<c2>"]``, one per concept.
        embeddings: ``(N, D)`` (one vector per token) or ``(N, V, D)`` float tensor, any device and dtype;
            stored as float32 on CPU. ``D`` is the sum of the encoders' widths (768 + 1280 for SDXL).
        keys: the family's :attr:`~conceptexpress.models.family.ModelFamily.export_keys`; default
            ``("emb_params",)`` (SD 1.x / 2.x: a diffusers file and an A1111 file). Two or more keys: one file
            ``{key: (V, dims[k])}`` per token (module docstring).
        dims: each encoder's width (:meth:`ModelFamily.embedding_dims`); needed with two or more keys, must sum
            to ``D``.

    Returns:
        One dict per token, in order: ``{"token", "index", "file", "a1111_file", "sha256", "a1111_sha256"}``,
        file paths relative to ``out_dir`` with ``/`` separators, SHA-256 of each file's bytes (the ``tokens``
        entries of ``manifest.json``). With several keys ``a1111_file`` is ``file`` (one file serves both).

    Raises:
        ValueError: tokens and embeddings disagree in number, a token is empty or has whitespace, two tokens map
            to the same file name, an embedding is not finite, or ``keys`` / ``dims`` do not fit ``D``.
        OutputError: a file cannot be written.
    """
    stems = _check_tokens(list(tokens))
    keys = tuple(keys) if keys is not None else (A1111_KEY,)
    if not keys or len(set(keys)) != len(keys) or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"`keys` must be distinct non-empty strings, got {keys!r}")
    if embeddings.ndim == 2:
        embeddings = embeddings[:, None, :]  # (N, 1, D)
    if embeddings.ndim != 3 or embeddings.shape[0] != len(tokens):
        raise ValueError(
            f"`embeddings` must be (N, D) or (N, V, D) with N = {len(tokens)} tokens, got shape {tuple(embeddings.shape)}"
        )
    if dims is None and len(keys) > 1:
        raise ValueError(f"`dims` (each text encoder's width) is needed to split the vectors into {keys}")
    dims = tuple(dims) if dims is not None else (int(embeddings.shape[-1]),)
    if len(dims) != len(keys) or sum(dims) != embeddings.shape[-1]:
        raise ValueError(f"`dims` {dims} must give one width per key {keys} and sum to D = {embeddings.shape[-1]}")
    embeddings = embeddings.detach().to("cpu", torch.float32)
    if not torch.isfinite(embeddings).all():
        bad = [t for t, e in zip(tokens, embeddings) if not torch.isfinite(e).all()]
        raise ValueError(f"embeddings of {bad} contain NaN or infinity; refusing to export them")

    out = Path(out_dir)
    (out / RunFolder.CONCEPTS_DIR).mkdir(parents=True, exist_ok=True)
    if len(keys) == 1:
        (out / RunFolder.A1111_DIR).mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (token, stem, emb) in enumerate(zip(tokens, stems, embeddings)):
        emb = emb.contiguous().clone()  # (V, D); safetensors refuses views that share storage
        file = f"{RunFolder.CONCEPTS_DIR}/{stem}.safetensors"
        meta = {"format": "pt", "token": token, "num_vectors": str(emb.shape[0])}
        if len(keys) == 1:
            a1111_file = f"{RunFolder.A1111_DIR}/{stem}.safetensors"
            data = save_tensors({token: emb}, metadata=meta)
            a1111_data = save_tensors({keys[0]: emb}, metadata={**meta, "name": stem})
            atomic_write_bytes(out / a1111_file, a1111_data)
        else:
            a1111_file = file
            parts = {k: part.contiguous() for k, part in zip(keys, split_embedding(emb, dims))}  # (V, D_k) each
            data = a1111_data = save_tensors(parts, metadata={**meta, "name": stem})
        atomic_write_bytes(out / file, data)
        entries.append({"token": token, "index": i, "file": file, "a1111_file": a1111_file,
                        # checked when the run is read back (read_token_file)
                        "sha256": hashlib.sha256(data).hexdigest(), "a1111_sha256": hashlib.sha256(a1111_data).hexdigest()})
    return entries


# ----------------------------------------------------------------------------- reading
def read_token_file(
    path: str | Path, token: str, *, sha256: str | None = None, source: str | Path | None = None
) -> tuple[torch.Tensor, ...]:
    """One token's vectors from a token file: one ``(V, D_k)`` float32 CPU tensor per text encoder, in encoder order.

    Reads (safetensors only, after :func:`~conceptexpress.io.checked.read_safetensors_checked`'s checks) a
    multi-encoder file (``{clip_l, clip_g}``: two tensors, ordered as the family's encoders), or a single-encoder
    file holding ``(D,)`` or ``(V, D)`` under the token's key or under a single other key (``emb_params``), as
    diffusers also accepts.

    Raises:
        RunFolderError: the file is missing, damaged or its SHA-256 differs from ``sha256``; it holds several keys
            that are neither the token nor a known encoder set; a tensor is not a float ``(V, D)`` with ``V >= 1``;
            or the encoders' tensors disagree in ``V``.
    """
    path = Path(path)
    state = read_safetensors_checked(path, sha256=sha256, source=source)
    order = _MULTI_KEYS.get(frozenset(state))
    if order is not None:
        names = order
    elif token in state:
        names = (token,)
    elif len(state) == 1:
        names = tuple(state)
    else:
        raise RunFolderError(f"token {token!r}: {str(path)!r} holds keys {sorted(state)} and none is the token")
    parts = []
    for name in names:
        emb = state[name]
        emb = emb[None] if emb.ndim == 1 else emb  # (V, D)
        if emb.ndim != 2 or emb.shape[0] == 0 or not emb.is_floating_point():
            raise RunFolderError(f"token {token!r}: {str(path)!r} holds {name!r} of shape {tuple(emb.shape)}, "
                                 "expected (V, D) floats")
        parts.append(emb.float())
    if len({p.shape[0] for p in parts}) != 1:
        raise RunFolderError(f"token {token!r}: {str(path)!r} holds {[tuple(p.shape) for p in parts]} for {names}; "
                             "every encoder needs the same number of vectors")
    return tuple(parts)
