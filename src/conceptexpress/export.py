"""Learned tokens on disk: one diffusers file and one A1111 / ComfyUI file per token, and loading them back.

Layout inside a run folder (DESIGN §5)::

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

import json
import re
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .io.atomic import atomic_write_bytes

MANIFEST = "manifest.json"
RUN_FORMAT = "conceptexpress-run-1"
CONCEPTS_DIR = "concepts"
A1111_DIR = "a1111"
A1111_KEY = "emb_params"

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
        One dict per token, in order: ``{"token", "index", "file", "a1111_file"}``, file paths relative to
        ``out_dir`` with ``/`` separators (the ``tokens`` entries of ``manifest.json``).

    Raises:
        ValueError: tokens and embeddings disagree in number, a token is empty or has whitespace, two tokens map
            to the same file name, or an embedding is not finite.
        OutputError: a file cannot be written.
    """
    from safetensors.torch import save as save_tensors

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
        atomic_write_bytes(out / file, save_tensors({token: emb}, metadata=meta))
        atomic_write_bytes(out / a1111_file, save_tensors({A1111_KEY: emb}, metadata={**meta, "name": stem}))
        entries.append({"token": token, "index": i, "file": file, "a1111_file": a1111_file})
    return entries


# ----------------------------------------------------------------------------- reading
def read_manifest(run_dir: str | Path, *, require_complete: bool = True) -> dict[str, Any]:
    """Read ``RUN/manifest.json``.

    Raises:
        InputError: the folder or manifest is missing, is not valid JSON, is not a run manifest, lists no
            tokens, or (with ``require_complete``) the run did not finish (``"complete"`` absent or false).
    """
    run = Path(run_dir)
    path = run / MANIFEST
    if not run.is_dir():
        raise InputError(f"run folder {str(run)!r} does not exist or is not a folder")
    if not path.is_file():
        raise InputError(f"{str(run)!r} is not a finished run (no {MANIFEST}); train its tokens first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot read {str(path)!r}: {str(exc).splitlines()[0]}") from None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith("conceptexpress-run-"):
        raise InputError(f"{str(path)!r} is not a conceptexpress run manifest (expected format {RUN_FORMAT!r})")
    if require_complete and manifest.get("complete") is not True:
        raise InputError(
            f"run {str(run)!r} is incomplete (manifest has \"complete\": {manifest.get('complete', 'absent')}); "
            "finish or rerun the training"
        )
    tokens = manifest.get("tokens")
    if not isinstance(tokens, list) or not tokens:
        raise InputError(f"{str(path)!r} lists no tokens")
    for entry in tokens:
        if not isinstance(entry, dict) or not isinstance(entry.get("token"), str) or not isinstance(entry.get("file"), str):
            raise InputError(f"{str(path)!r}: every token entry needs \"token\" and \"file\" strings, got {entry!r}")
    return manifest


def _token_file(run: Path, rel: str, token: str) -> Path:
    path = (run / rel).resolve()
    if not path.is_relative_to(run.resolve()):
        raise InputError(f"token {token!r}: file {rel!r} lies outside the run folder {str(run)!r}")
    if path.suffix.lower() != ".safetensors":
        # Pickled embeddings (.bin/.pt) can run code on load; only safetensors files are read.
        raise InputError(f"token {token!r}: file {rel!r} is not a .safetensors file; pickles are never loaded")
    if not path.is_file():
        raise InputError(f"token {token!r}: file {str(run / rel)!r} is missing; the run folder is damaged")
    return path


def read_token_embeddings(run_dir: str | Path) -> dict[str, torch.Tensor]:
    """The learned embeddings of a finished run, ``{token: (V, D) float32 tensor on CPU}``, in manifest order.

    Reads the diffusers files listed in ``manifest.json`` with safetensors only. A file may hold ``(D,)`` or
    ``(V, D)`` under the token's key (or under a single other key, as diffusers also accepts).

    Raises:
        InputError: manifest missing or incomplete, a listed file missing, not safetensors, unreadable, or
            holding something other than one embedding of the manifest's width.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run = Path(run_dir)
    manifest = read_manifest(run)
    dim = manifest.get("embedding_dim")
    out: dict[str, torch.Tensor] = {}
    for entry in manifest["tokens"]:
        token = entry["token"]
        path = _token_file(run, entry["file"], token)
        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(f"token {token!r}: cannot read {str(path)!r}: {str(exc).splitlines()[0]}") from None
        if token in state:
            emb = state[token]
        elif len(state) == 1:
            emb = next(iter(state.values()))
        else:
            raise InputError(f"token {token!r}: {str(path)!r} holds keys {sorted(state)} and none is the token")
        if emb.ndim == 1:
            emb = emb[None]  # (1, D)
        if emb.ndim != 2 or emb.shape[0] == 0 or (isinstance(dim, int) and emb.shape[1] != dim):
            raise InputError(
                f"token {token!r}: {str(path)!r} holds shape {tuple(emb.shape)}, expected (V, {dim or 'D'})"
            )
        out[token] = emb.float()
    return out


# ----------------------------------------------------------------------------- loading into a pipeline
def _vector_names(token: str, num_vectors: int) -> list[str]:
    # diffusers' multi-vector convention: "<c1>", "<c1>_1", "<c1>_2", … (maybe_convert_prompt expands them).
    return [token] + [f"{token}_{i}" for i in range(1, num_vectors)]


def load_tokens_into(pipe, run_dir: str | Path) -> list[str]:
    """Add the tokens of a finished run to a loaded pipeline with diffusers' own ``load_textual_inversion``.

    The diffusers files are passed explicitly with their tokens and ``use_safetensors=True`` (so diffusers
    never falls back to a pickle). A token the tokenizer already has with the same embedding (e.g. a second
    call) is skipped; with a different embedding it is an error, because prompts would silently use the old one.

    Returns:
        All tokens of the run, in manifest order (newly added or already present).

    Raises:
        InputError: the run cannot be read, its embedding width differs from the pipeline's text encoder
            (the run was trained on another base model), or a token exists with a different embedding.
    """
    run = Path(run_dir)
    manifest = read_manifest(run)
    embeddings = read_token_embeddings(run)
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    weight = text_encoder.get_input_embeddings().weight  # (vocab, D)
    width = weight.shape[-1]
    vocab = tokenizer.get_vocab()
    to_load: list[tuple[str, str]] = []
    for entry in manifest["tokens"]:
        token = entry["token"]
        emb = embeddings[token]  # (V, D)
        if emb.shape[-1] != width:
            raise InputError(
                f"token {token!r} has width {emb.shape[-1]} but the pipeline's text encoder has width {width}; "
                f"the run was trained on {manifest.get('base_model', 'another model')!r}"
            )
        names = _vector_names(token, emb.shape[0])
        present = [n for n in names if n in vocab]
        # diffusers refuses "<c1>" when "<c1>_1" exists, so a longer multi-vector token also counts as present.
        longer = f"{token}_{emb.shape[0]}" in vocab
        if not present and not longer:
            to_load.append((token, str(run / entry["file"])))
            continue
        same = len(present) == len(names) and not longer
        if same:
            rows = weight[[vocab[n] for n in names]].detach()  # (V, D)
            same = torch.equal(rows, emb.to(rows.device, rows.dtype))
        if not same:
            raise InputError(
                f"token {token!r} is already in the pipeline's tokenizer with a different embedding; "
                "load this run into a fresh pipeline"
            )
    if to_load:
        pipe.load_textual_inversion(
            [path for _, path in to_load], token=[token for token, _ in to_load], use_safetensors=True
        )
    return [entry["token"] for entry in manifest["tokens"]]

