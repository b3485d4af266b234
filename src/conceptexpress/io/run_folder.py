"""The run folder: file names, the manifest, and a run's tokens in a pipeline — defined once, here.

Layout of one run (one photo)::

    RUN/localization.json          localization done (``LOCALIZATION_MANIFEST``, :mod:`.localization_files`)
    RUN/localization.safetensors   masks, centroids, [EOT] map
    RUN/checkpoints/               resumable training state (``--resume``)
    RUN/concepts/<stem>.safetensors   {"<c1>": (V, D) float32}   diffusers textual-inversion file (SDXL: the one
                                      {"clip_l", "clip_g"} file, :mod:`conceptexpress.export`)
    RUN/a1111/<stem>.safetensors      {"emb_params": (V, D)}     A1111 WebUI / ComfyUI file (SD 1.x / 2.x)
    RUN/pipeline/                  ``--method bas-ft`` only: the fine-tuned pipeline (diffusers folder, safetensors)
    RUN/manifest.json              tokens, model, configs, versions; ``"complete": true`` written last
    RUN/run.json                   the run's options (image, model, method, method configs), written first

Every file is read through this module's checks (docs/inputs.md, "Run-folder guarantees"): a path in a JSON file
is resolved with :func:`resolve_inside` (never outside the folder), and a tensor file with
:func:`read_safetensors_checked` (SHA-256 recorded by the JSON that names it, header, names, shapes, dtypes).
A file that fails raises :class:`~conceptexpress.errors.RunFolderError` naming it.

:class:`RunManifest` reads, checks and writes ``manifest.json``. The token files' formats are
:mod:`conceptexpress.export`; a run's tokens are read back and put into a pipeline by
:mod:`conceptexpress.embeddings`. Nothing here imports diffusers or transformers (versions are read from the
installed package metadata).
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .. import __version__
from ..errors import InputError, RunFolderError
from .atomic import atomic_write_json

# ----------------------------------------------------------------------------- file names
RUN_MANIFEST = "manifest.json"
RUN_FORMAT = "conceptexpress-run-1"
RUN_FORMAT_PREFIX = "conceptexpress-run-"
LOCALIZATION_MANIFEST = "localization.json"
LOCALIZATION_TENSORS = "localization.safetensors"
CHECKPOINTS_DIR = "checkpoints"
CONCEPTS_DIR = "concepts"
A1111_DIR = "a1111"
A1111_KEY = "emb_params"
SAMPLES_DIR = "samples"
PIPELINE_DIR = "pipeline"  # --method bas-ft: the fine-tuned diffusers pipeline (the run's base model)
RUN_OPTIONS = "run.json"
RUN_OPTIONS_FORMAT = "conceptexpress-run-options-1"
GENERATED_DIR = "generated"
# What a run trained: removed (renamed away first) before a new run starts in the same folder.
SOURCE_STEM = "source"  # RUN/source.<ext>: the source photo's bytes, so a run never reads outside its folder
TRAINED_OUTPUTS = (RUN_MANIFEST, RUN_OPTIONS, CHECKPOINTS_DIR, CONCEPTS_DIR, A1111_DIR, SAMPLES_DIR, GENERATED_DIR,
                   "history.json", "loss.png", PIPELINE_DIR)


def source_copy_name(image_path: str | Path) -> str:
    """``source.<ext>`` for a photo (its extension lower-cased, ``.img`` when it has none)."""
    suffix = Path(image_path).suffix.lower()
    return SOURCE_STEM + (suffix if re.fullmatch(r"\.[a-z0-9]{1,8}", suffix) else ".img")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- checked reads
def resolve_inside(run_dir: str | Path, rel: Any, *, source: str | Path) -> Path:
    """``run_dir / rel`` resolved, refused unless it lies inside ``run_dir``.

    ``rel`` comes from a JSON file of the run (``source``, named in the message): it must be a non-empty
    relative path without ``..``; after symlinks are followed it must still be inside the folder.

    Raises:
        RunFolderError: ``rel`` is not a string, is absolute, climbs out with ``..``, or a symlink leads out.
    """
    run = Path(run_dir)
    if not isinstance(rel, str) or not rel.strip():
        raise RunFolderError(f"{str(source)!r} names the file {rel!r}, which is not a relative path")
    parts = rel.replace("\\", "/").split("/")
    if Path(rel).is_absolute() or rel.startswith(("/", "\\")) or ".." in parts or ":" in parts[0]:
        raise RunFolderError(f"{str(source)!r} names {rel!r}, which lies outside the run folder {str(run)!r}; refused")
    path = (run / rel).resolve()
    if not path.is_relative_to(run.resolve()):
        raise RunFolderError(f"{str(source)!r} names {rel!r}, which leads outside the run folder {str(run)!r} "
                             "(a symlink); refused")
    return path


def read_json_checked(path: str | Path) -> dict[str, Any]:
    """A run folder's JSON object. Raises RunFolderError naming ``path`` when unreadable or not an object."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{str(path)!r} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunFolderError(f"{str(path)!r} is damaged (not valid JSON: {str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise RunFolderError(f"{str(path)!r} is damaged (a JSON {type(data).__name__}, expected an object)")
    return data


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8",
           torch.int64: "I64", torch.int32: "I32", torch.bool: "BOOL"}


def read_safetensors_checked(
    path: str | Path,
    *,
    sha256: str | None = None,
    expected: Mapping[str, tuple[tuple[int | None, ...] | None, torch.dtype | None]] | None = None,
    source: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """Load a safetensors file of a run folder after checking it; tensors on CPU.

    Args:
        path: the file (already resolved with :func:`resolve_inside`).
        sha256: the hex SHA-256 recorded by the JSON that names the file (None: not recorded, e.g. older runs).
        expected: ``{name: (shape, dtype)}`` the file must hold; ``None`` in a shape means any size, a ``None``
            shape or dtype is not checked. Other names may be present.
        source: the JSON file that named ``path`` (for the message).

    Raises:
        RunFolderError: missing, SHA-256 differs, header unreadable (truncated, garbled), a name missing, or a
            shape or dtype other than expected.
    """
    path = Path(path)
    named = f" (named by {str(source)!r})" if source is not None else ""
    if not path.is_file():
        raise RunFolderError(f"{str(path)!r}{named} is missing")
    if sha256 is not None and file_sha256(path) != sha256:
        raise RunFolderError(f"{str(path)!r} is damaged: its SHA-256 differs from the one recorded{named}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = set(f.keys())
            for name, (shape, dtype) in (expected or {}).items():
                if name not in names:
                    raise RunFolderError(f"{str(path)!r} is damaged: it holds no tensor {name!r}")
                got = tuple(f.get_slice(name).get_shape())
                if shape is not None and (len(got) != len(shape) or any(w not in (None, g) for w, g in zip(shape, got))):
                    raise RunFolderError(f"{str(path)!r} is damaged: {name!r} has shape {got}, expected "
                                         f"{tuple('*' if w is None else w for w in shape)}")
                if dtype is not None and f.get_slice(name).get_dtype() != _DTYPES.get(dtype, str(dtype)):
                    raise RunFolderError(f"{str(path)!r} is damaged: {name!r} has dtype "
                                         f"{f.get_slice(name).get_dtype()}, expected {_DTYPES.get(dtype, dtype)}")
            return {name: f.get_tensor(name) for name in sorted(names)}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise RunFolderError(f"{str(path)!r} is damaged ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _installed(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def versions(*extra: str) -> dict[str, str]:
    """Versions every written result records: conceptexpress, torch, diffusers, transformers, Python.

    ``extra`` names more distributions (e.g. ``"scikit-learn"``). Read from package metadata, so nothing heavy
    is imported.
    """
    out = {
        "conceptexpress": __version__,
        "torch": torch.__version__,
        "diffusers": _installed("diffusers"),
        "transformers": _installed("transformers"),
        "python": platform.python_version(),
    }
    out.update({name: _installed(name) for name in extra})
    return out


def token_names(n: int) -> list[str]:
    """The placeholder tokens of a run with ``n`` concepts: ``<c1> … <cN>``."""
    return [f"<c{i + 1}>" for i in range(n)]


# ----------------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class RunManifest(Mapping):
    """``RUN/manifest.json``: the typed fields every reader needs, and the whole JSON as a read-only mapping.

    ``manifest["sample_passes"]`` and ``manifest.get("config")`` read any recorded entry; the attributes are the
    ones other stages rely on. Build one with :meth:`read` (checks it) or :meth:`from_dict`, write it with
    :meth:`write`.
    """

    tokens: tuple[Mapping[str, Any], ...]  # {"token", "index", "file", "a1111_file", "mask"} per concept
    base_model: str | None = None
    single_file_config: str | None = None
    method: str = "conceptexpress"
    image: str | None = None
    image_sha256: str | None = None
    embedding_dim: int | None = None
    complete: bool = False
    format: str = RUN_FORMAT
    data: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)  # the whole JSON object

    # Mapping over the JSON object
    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def token_list(self) -> list[str]:
        """The run's tokens in manifest order (``["<c1>", "<c2>", …]``)."""
        return [entry["token"] for entry in self.tokens]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "manifest") -> RunManifest:
        """Check a manifest's JSON object (schema and types) and wrap it.

        Raises:
            RunFolderError: naming ``source`` when it is not a run manifest, lists no tokens, a token twice, or an
                entry of the wrong type.
        """
        if not isinstance(data, Mapping) or not str(data.get("format", "")).startswith(RUN_FORMAT_PREFIX):
            raise RunFolderError(f"{source!r} is not a conceptexpress run manifest (expected format {RUN_FORMAT!r})")
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not tokens:
            raise RunFolderError(f"{source!r} lists no tokens")
        seen: set[str] = set()
        for entry in tokens:
            if not isinstance(entry, dict) or not isinstance(entry.get("token"), str) or not entry["token"] \
                    or not isinstance(entry.get("file"), str):
                raise RunFolderError(f"{source!r}: every token entry needs \"token\" and \"file\" strings, got {entry!r}")
            for key in ("a1111_file", "mask", "sha256", "a1111_sha256"):
                if entry.get(key) is not None and not isinstance(entry[key], str):
                    raise RunFolderError(f"{source!r}: token {entry['token']!r} has {key} {entry[key]!r}, expected a string")
            if entry["token"] in seen:
                raise RunFolderError(f"{source!r} lists the token {entry['token']!r} twice")
            seen.add(entry["token"])
        for key in ("base_model", "single_file_config", "method", "image", "image_sha256"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise RunFolderError(f"{source!r}: {key!r} is {data[key]!r}, expected a string")
        for key in ("embedding_dim", "num_concepts"):
            value = data.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise RunFolderError(f"{source!r}: {key!r} is {value!r}, expected a positive integer")
        if data.get("num_concepts") is not None and data["num_concepts"] != len(tokens):
            raise RunFolderError(f"{source!r}: num_concepts is {data['num_concepts']} but {len(tokens)} tokens are listed")
        if not isinstance(data.get("complete", False), bool):
            raise RunFolderError(f"{source!r}: 'complete' is {data['complete']!r}, expected true or false")
        samples = data.get("samples")
        if samples is not None and not (
            isinstance(samples, dict) and all(isinstance(v, list) and all(isinstance(f, str) for f in v) for v in samples.values())
        ):
            raise RunFolderError(f"{source!r}: 'samples' must map each prompt to a list of file names")
        if data.get("config") is not None and not isinstance(data["config"], dict):
            raise RunFolderError(f"{source!r}: 'config' is {data['config']!r}, expected an object")
        return cls(
            tokens=tuple(tokens),
            base_model=data.get("base_model"),
            single_file_config=data.get("single_file_config"),
            method=str(data.get("method") or "conceptexpress"),
            image=data.get("image"),
            image_sha256=data.get("image_sha256"),
            embedding_dim=data.get("embedding_dim"),
            complete=data.get("complete") is True,
            format=str(data["format"]),
            data=dict(data),
        )

    def files(self) -> list[str]:
        """Every file the manifest names inside its run folder (relative paths, as written)."""
        out = [e[k] for e in self.tokens for k in ("file", "a1111_file", "mask") if isinstance(e.get(k), str)]
        out += [f for files in (self.data.get("samples") or {}).values() for f in files]
        out += [self.data[k] for k in ("localization", "overlay", "loss_curve", "history", "source_image")
                if isinstance(self.data.get(k), str)]
        return out

    @classmethod
    def read(cls, run_dir: str | Path, *, require_complete: bool = True) -> RunManifest:
        """Read ``RUN/manifest.json``.

        Raises:
            InputError: the folder or manifest is missing, or (with ``require_complete``) the run did not finish
                (``"complete"`` absent or false). RunFolderError (an InputError): the manifest is not valid JSON,
                not a run manifest, has an entry of the wrong type, lists no tokens or one twice, or names a file
                outside the run folder.
        """
        run = Path(run_dir)
        path = run / RUN_MANIFEST
        if not run.is_dir():
            raise InputError(f"run folder {str(run)!r} does not exist or is not a folder")
        if not path.is_file():
            raise InputError(f"{str(run)!r} is not a finished run (no {RUN_MANIFEST}); train its tokens first")
        data = read_json_checked(path)
        if (
            require_complete
            and isinstance(data, dict)
            and str(data.get("format", "")).startswith(RUN_FORMAT_PREFIX)
            and data.get("complete") is not True
            and isinstance(data.get("complete", False), bool)  # another type: a damaged manifest (from_dict)
        ):
            raise InputError(
                f"run {str(run)!r} is incomplete (manifest has \"complete\": {data.get('complete', 'absent')}); "
                "finish or rerun the training"
            )
        manifest = cls.from_dict(data, source=str(path))
        for rel in manifest.files():  # no entry may lead out of the folder, whether or not the reader uses it
            resolve_inside(run, rel, source=path)
        return manifest

    def as_dict(self) -> dict[str, Any]:
        """The JSON object (a copy)."""
        return dict(self.data)

    def write(self, run_dir: str | Path) -> Path:
        """Write ``RUN/manifest.json`` atomically (the last file of a run)."""
        path = Path(run_dir) / RUN_MANIFEST
        atomic_write_json(path, self.as_dict())
        return path


def read_manifest(run_dir: str | Path, *, require_complete: bool = True) -> RunManifest:
    """:meth:`RunManifest.read` (kept as a function: the name the rest of the package uses)."""
    return RunManifest.read(run_dir, require_complete=require_complete)
