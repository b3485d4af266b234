"""A run's learned tokens read back, and put into a loaded pipeline (and taken out again) — for every family.

The files themselves (names, formats) are :mod:`conceptexpress.export`. Here:

- :func:`read_token_embeddings` — ``{token: (V, D)}`` of a finished run, ``D`` the sum of the text encoders'
  widths (SDXL: ``clip_l`` and ``clip_g`` concatenated in encoder order, as the tokens are trained);
- :func:`load_tokens_into` / :func:`run_tokens` — the tokens in a pipeline through diffusers' own
  ``load_textual_inversion``, one call per text encoder of the pipeline's family (SDXL: ``text_encoder`` +
  ``tokenizer`` and ``text_encoder_2`` + ``tokenizer_2``, each given its part of the vectors and ``token=``);
  :func:`run_tokens` unloads them from every encoder on exit, so a caller's pipeline is handed back as found.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import InputError, RunFolderError
from .export import read_token_file, split_embedding
from .io.checked import resolve_inside
from .io.manifest import RunManifest
from .io.run_folder import RunFolder, read_manifest
from .models.family import ModelFamily, TextEncoderSpec, family_of

__all__ = ["load_tokens_into", "read_token_embeddings", "run_tokens"]

# A token's vectors: one (V, D) tensor (or (D,)), encoders concatenated; or one (V, D_k) tensor per encoder.
TokenVectors = torch.Tensor | Sequence[torch.Tensor]


# ----------------------------------------------------------------------------- reading a run
def _token_file(run: Path, rel: str, token: str) -> Path:
    path = resolve_inside(run, rel, source=run / RunFolder.MANIFEST)
    if path.suffix.lower() != ".safetensors":
        # Pickled embeddings (.bin/.pt) can run code on load; only safetensors files are read.
        raise RunFolderError(f"token {token!r}: file {rel!r} is not a .safetensors file; pickles are never loaded")
    if not path.is_file():
        raise RunFolderError(f"token {token!r}: file {str(run / rel)!r} is missing; the run folder is damaged")
    return path


def _read_token_parts(run_dir: str | Path) -> tuple[dict[str, tuple[torch.Tensor, ...]], RunManifest]:
    """``({token: one (V, D_k) tensor per encoder}, manifest)`` of a finished run, in manifest order."""
    run = Path(run_dir)
    manifest = read_manifest(run)
    dim = manifest.embedding_dim
    out: dict[str, tuple[torch.Tensor, ...]] = {}
    for entry in manifest.tokens:
        token = entry["token"]
        path = _token_file(run, entry["file"], token)
        parts = read_token_file(path, token, sha256=entry.get("sha256"), source=run / RunFolder.MANIFEST)
        width = sum(p.shape[1] for p in parts)
        if dim is not None and width != dim:
            shape = (parts[0].shape[0], width)
            raise RunFolderError(f"token {token!r}: {str(path)!r} holds shape {shape}, expected (V, {dim})")
        out[token] = parts
    return out, manifest


def read_token_embeddings(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The learned embeddings of a finished run, ``{token: (V, D) float32 tensor on CPU}``, in manifest order.

    Reads the files listed in ``manifest.json`` with safetensors only (:func:`conceptexpress.export.read_token_file`).
    A single-encoder file may hold ``(D,)`` or ``(V, D)`` under the token's key (or under a single other key, as
    diffusers also accepts); an SDXL file's ``clip_l`` and ``clip_g`` come back concatenated, ``(V, 768 + 1280)``.

    Raises:
        InputError: manifest missing or incomplete, a listed file missing, not safetensors, unreadable, or
            holding something other than one embedding of the manifest's width.
    """
    parts, _ = _read_token_parts(run_dir)
    return {token: torch.cat(p, dim=-1) for token, p in parts.items()}


# ----------------------------------------------------------------------------- tokens in a pipeline
def _vector_names(token: str, num_vectors: int) -> list[str]:
    # diffusers' multi-vector convention: "<c1>", "<c1>_1", "<c1>_2", … (maybe_convert_prompt expands them).
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def _per_encoder(token: str, vectors: TokenVectors, family: ModelFamily, dims: tuple[int, ...], origin: str
                 ) -> tuple[torch.Tensor, ...]:
    """``vectors`` as one ``(V, D_k)`` tensor per encoder of ``family``, widths checked against ``dims``."""
    n = len(family.encoders)
    if isinstance(vectors, torch.Tensor):
        emb = vectors if vectors.ndim == 2 else vectors[None]  # (V, ΣD)
        if n > 1 and emb.shape[-1] == sum(dims):
            return split_embedding(emb, dims)
        parts: tuple[torch.Tensor, ...] = (emb,)
    else:
        parts = tuple(p if p.ndim == 2 else p[None] for p in vectors)
    if len(parts) != n:
        if len(parts) == 1:  # a concatenated tensor of the wrong total width
            raise InputError(
                f"token {token!r} has width {parts[0].shape[-1]} but the pipeline's text encoders have widths "
                f"{' + '.join(map(str, dims))}; the tokens were trained on {origin!r}"
            )
        raise InputError(
            f"token {token!r} has vectors for {len(parts)} text encoders but the pipeline ({family.label}) has {n}; "
            f"the tokens were trained on {origin!r}"
        )
    for k, (part, width) in enumerate(zip(parts, dims)):
        if part.shape[-1] != width:
            which = "" if n == 1 else f" {k + 1} ({family.encoders[k].key})"
            raise InputError(
                f"token {token!r} has width {part.shape[-1]} but the pipeline's text encoder{which} has width {width}; "
                f"the tokens were trained on {origin!r}"
            )
    return parts


def _state_in(pipe, spec: TextEncoderSpec, token: str, emb: torch.Tensor) -> str:
    """``"absent"``, ``"same"`` or ``"different"``: ``token`` in one encoder of ``pipe`` against ``emb`` (V, D)."""
    vocab = getattr(pipe, spec.tokenizer).get_vocab()
    names = _vector_names(token, emb.shape[0])
    present = [n for n in names if n in vocab]
    # diffusers refuses "<c1>" when "<c1>_1" exists, so a longer multi-vector token also counts as present.
    longer = f"{token}_{emb.shape[0]}" in vocab
    if not present and not longer:
        return "absent"
    if len(present) == len(names) and not longer:
        weight = getattr(pipe, spec.encoder).get_input_embeddings().weight  # (vocab, D)
        rows = weight[[vocab[n] for n in names]].detach()  # (V, D)
        if torch.equal(rows, emb.to(rows.device, rows.dtype)):
            return "same"
    return "different"


def _add_tokens(pipe, embeddings: Mapping[str, TokenVectors], *, origin: str,
                files: Mapping[str, str] | None = None) -> list[str]:
    """Add ``{token: vectors}`` to every text encoder of ``pipe`` with diffusers' ``load_textual_inversion``;
    return the tokens added.

    ``vectors`` is ``(V, ΣD)`` / ``(ΣD,)`` (encoders concatenated) or one ``(V, D_k)`` tensor per encoder. A token
    already present with the same embedding in every encoder is skipped (not returned); with a different one (in
    any encoder) it is an error, because prompts would silently use the old one. ``files`` (token → safetensors
    path) loads single-encoder pipelines from the run's files instead of the tensors, as a user would.
    """
    family = family_of(pipe)
    dims = family.embedding_dims(pipe)
    parts = {t: _per_encoder(t, v, family, dims, origin) for t, v in embeddings.items()}
    to_load: list[str] = []
    for token, vectors in parts.items():
        states = {_state_in(pipe, spec, token, emb) for spec, emb in zip(family.encoders, vectors)}
        if states == {"absent"}:
            to_load.append(token)
        elif states != {"same"}:
            raise InputError(
                f"token {token!r} is already in the pipeline's tokenizer with a different embedding; "
                "load these tokens into a fresh pipeline"
            )
    if not to_load:
        return []
    if files is not None and len(family.encoders) == 1:
        pipe.load_textual_inversion([files[t] for t in to_load], token=to_load, use_safetensors=True)
        return to_load
    done: list[TextEncoderSpec] = []
    try:
        for k, spec in enumerate(family.encoders):
            pipe.load_textual_inversion(
                [parts[t][k] for t in to_load], token=to_load,
                tokenizer=getattr(pipe, spec.tokenizer), text_encoder=getattr(pipe, spec.encoder),
            )
            done.append(spec)
    except BaseException:
        _remove_tokens(pipe, to_load, done)  # never leave a token in one encoder only
        raise
    return to_load


def _remove_tokens(pipe, tokens: list[str], specs: Sequence[TextEncoderSpec]) -> None:
    """Unload ``tokens`` (every vector: ``"<c1>"``, ``"<c1>_1"``, …) from the encoders ``specs`` of ``pipe``."""
    if not tokens:
        return
    for spec in specs:
        tokenizer = getattr(pipe, spec.tokenizer)
        vocab = tokenizer.get_vocab()
        names = []
        for t in tokens:
            names.append(t)
            i = 1
            while f"{t}_{i}" in vocab:
                names.append(f"{t}_{i}")
                i += 1
        pipe.unload_textual_inversion(names, tokenizer=tokenizer, text_encoder=getattr(pipe, spec.encoder))


def load_tokens_into(pipe, run_dir: str | Path) -> list[str]:
    """Add the tokens of a finished run to a loaded pipeline with diffusers' own ``load_textual_inversion``.

    SD 1.x / 2.x: the diffusers files are passed explicitly with their tokens and ``use_safetensors=True`` (so
    diffusers never falls back to a pickle). SDXL: the ``{clip_l, clip_g}`` file is split and loaded with one
    call per text encoder (``token=``, ``text_encoder=``, ``tokenizer=``). A token the tokenizers already have with
    the same embedding (e.g. a second call) is skipped; with a different embedding it is an error. To take the
    tokens out again afterwards, use :func:`run_tokens` instead.

    Returns:
        All tokens of the run, in manifest order (newly added or already present).

    Raises:
        InputError: the run cannot be read, its embedding widths differ from the pipeline's text encoders
            (the run was trained on another base model), or a token exists with a different embedding.
    """
    with _loaded(pipe, run_dir) as (names, _):
        return names


@contextmanager
def _loaded(pipe, tokens: str | Path | Mapping[str, TokenVectors]) -> Iterator[tuple[list[str], list[str]]]:
    # Yields (all tokens, tokens this call added); removes nothing (run_tokens does).
    if isinstance(tokens, str | Path):
        run = Path(tokens)
        parts, manifest = _read_token_parts(run)
        files = {e["token"]: str(run / e["file"]) for e in manifest.tokens}
        added = _add_tokens(pipe, parts, origin=str(manifest.base_model or "another model"), files=files)
        yield manifest.token_list, added
    else:
        added = _add_tokens(pipe, dict(tokens), origin="another model")
        yield list(tokens), added


@contextmanager
def run_tokens(pipe, tokens: str | Path | Mapping[str, TokenVectors]) -> Iterator[list[str]]:
    """``with run_tokens(pipe, run) as names:`` — a run's tokens in ``pipe`` for the block, removed on exit.

    ``tokens`` is a finished run folder or an in-memory ``{token: (D,) or (V, D) tensor}`` (``D`` the sum of the
    encoders' widths, concatenated in encoder order; or a tuple of one ``(V, D_k)`` tensor per encoder). Tokens
    the pipeline already had with the same embedding stay; the ones this call added are unloaded from every text
    encoder on exit (also on an exception), so the pipeline's tokenizers and embedding tables are handed back as
    they were found.

    Yields:
        The tokens, in order.

    Raises:
        InputError: as :func:`load_tokens_into`.
    """
    with _loaded(pipe, tokens) as (names, added):
        try:
            yield names
        finally:
            _remove_tokens(pipe, added, family_of(pipe).encoders)
