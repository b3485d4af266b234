"""``RUN/manifest.json`` as a typed object: :class:`RunManifest`, built in one place (:meth:`RunManifest.build`).

The manifest lists a run's tokens and their files, the base model and its family, the configs used and the
versions; ``"complete": true`` marks a finished run. ``extract`` and
:meth:`~conceptexpress.learn.api.LearnedTokens.save` both build it with :meth:`RunManifest.build`, so the fields
every run has (``format``, ``family``, ``num_concepts``, ``versions``, ``complete``, …) are set there only; it is
read and written by :class:`~conceptexpress.io.run_folder.RunFolder` (``read_manifest`` / ``write_manifest``).
Nothing here imports diffusers or transformers (versions are read from the installed package metadata).
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import torch

from .. import __version__
from ..errors import RunFolderError

__all__ = ["RUN_FORMAT", "RunManifest", "token_names", "versions"]

RUN_FORMAT = "conceptexpress-run-1"  # the manifest's "format"; readers accept any "conceptexpress-run-*"
RUN_FORMAT_PREFIX = "conceptexpress-run-"


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
    ones other stages rely on. A finished run's is made by :meth:`build`; one read back is checked by
    :meth:`from_dict` (:meth:`RunFolder.read_manifest <conceptexpress.io.run_folder.RunFolder.read_manifest>`).
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

    @classmethod
    def build(
        cls,
        tokens: Sequence[Mapping[str, Any]],
        *,
        method: str,
        base_model: str | None,
        family: str,
        embedding_dim: int,
        config: Mapping[str, Any],
        entries: Mapping[str, Any] | None = None,
    ) -> RunManifest:
        """The manifest of a finished run (``"complete": true``), checked as :meth:`from_dict` checks one read back.

        Args:
            tokens: one entry per concept, ``{"token", "file", "a1111_file", "sha256", …[, "mask"]}``
                (:func:`conceptexpress.export.write_token_files`).
            method: the method's registry name (``"conceptexpress"``, ``"bas-dagger"``, …).
            base_model: the model to load the tokens into (hub id, absolute path, or ``"pipeline"`` for bas-ft).
            family: the base model's family name (``"sd1"``, ``"sd2"``, ``"sdxl"``; decides the token files).
            embedding_dim: a token vector's width (SDXL: both encoders', 768 + 1280).
            config: the resolved configs (:func:`conceptexpress.config.config_dict`).
            entries: what the writer adds (image, seed, steps, samples, the run's file names, …), in that order.
        """
        data = {
            "format": RUN_FORMAT,
            "method": method,
            "base_model": base_model,
            "family": family,  # sd1, sd2 or sdxl (conceptexpress.models.family)
            "tokens": [dict(t) for t in tokens],
            "num_concepts": len(tokens),
            "num_vectors": 1,
            "embedding_dim": int(embedding_dim),
            **dict(entries or {}),
            "config": dict(config),
            "versions": versions(),
            "complete": True,
        }
        return cls.from_dict(data, source="the new run manifest")

    def files(self) -> list[str]:
        """Every file the manifest names inside its run folder (relative paths, as written)."""
        out = [e[k] for e in self.tokens for k in ("file", "a1111_file", "mask") if isinstance(e.get(k), str)]
        out += [f for files in (self.data.get("samples") or {}).values() for f in files]
        out += [self.data[k] for k in ("localization", "overlay", "loss_curve", "history", "source_image")
                if isinstance(self.data.get(k), str)]
        return out

    def as_dict(self) -> dict[str, Any]:
        """The JSON object (a copy)."""
        return dict(self.data)
