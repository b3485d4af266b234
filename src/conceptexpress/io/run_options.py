"""What makes a run *this* run: ``RUN/run.json``, and clearing a folder's old run before a new one starts.

A rerun of ``extract`` into a folder is either a resume of the run there or a new run, never a mix: its options
(:func:`run_options`) are compared with the ones the folder's run was started with (``run.json``, written before
any training; for runs of earlier versions the finished ``manifest.json``). Options are the image bytes, the base
model, the method, the user's masks (``--masks``, by SHA-256) and the method's configs (``LocalizeConfig``,
``TrainConfig``, ``FineTuneConfig`` for ``bas-ft``); how the work runs
(``RuntimeConfig``) and the samples drawn after training (``SampleConfig``) are not part of them.

A new run removes what the previous run trained (:data:`~.run_folder.TRAINED_OUTPUTS`) with
:func:`clear_outputs`: renamed into a hidden folder inside the run folder first (so the folder never holds half
of an old run), then deleted. The localization is not removed: it is reused when it matches, and recomputed
otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import OutputError, RunFolderError
from .atomic import atomic_write_json
from .run_folder import RUN_MANIFEST, RUN_OPTIONS, RUN_OPTIONS_FORMAT, RunManifest, read_json_checked

__all__ = ["clear_outputs", "option_differences", "read_run_options", "run_options", "write_run_options"]

_OLD_PREFIX = ".old-run-"
_COMPARED = ("LocalizeConfig", "TrainConfig", "FineTuneConfig")  # the ones a run records (FineTune: bas-ft)


def run_options(
    *, image_sha256: str, model: str, single_file_config: str | None, method: str, configs: Mapping[str, Any],
    masks_sha256: str | None = None,
) -> dict[str, Any]:
    """The JSON object of ``run.json``. ``model`` as recorded in the manifest (a local path made absolute);
    ``configs`` is ``config_dict(localize, train[, finetune])`` of the options asked for; ``masks_sha256`` the
    user's mask folder's (None: the localization's masks)."""
    return {
        "format": RUN_OPTIONS_FORMAT,
        "image_sha256": image_sha256,
        "model": model,
        "single_file_config": single_file_config,
        "method": method,
        "masks_sha256": masks_sha256,
        "config": {name: dict(configs[name]) for name in _COMPARED if name in configs},
    }


def write_run_options(run_dir: str | Path, options: Mapping[str, Any]) -> Path:
    """Write ``RUN/run.json`` atomically."""
    return atomic_write_json(Path(run_dir) / RUN_OPTIONS, dict(options))


def read_run_options(run_dir: str | Path) -> dict[str, Any] | None:
    """The options of the run in ``run_dir``: ``run.json``, else those of a finished ``manifest.json`` written
    before ``run.json`` existed, else None (no run there).

    Raises:
        RunFolderError: ``run.json`` (or, without it, ``manifest.json``) is damaged or of the wrong schema.
    """
    run = Path(run_dir)
    path = run / RUN_OPTIONS
    if path.is_file():
        data = read_json_checked(path)
        config = data.get("config")
        if data.get("format") != RUN_OPTIONS_FORMAT or not isinstance(config, dict) or not all(
            isinstance(config.get(k), dict) for k in _COMPARED[:2]
        ) or not all(isinstance(data.get(k), str) for k in ("image_sha256", "model", "method")):
            raise RunFolderError(f"{str(path)!r} is damaged: not a {RUN_OPTIONS_FORMAT} object")
        return data
    if not (run / RUN_MANIFEST).is_file():
        return None
    manifest = RunManifest.from_dict(read_json_checked(run / RUN_MANIFEST), source=str(run / RUN_MANIFEST))
    config = manifest.get("config") or {}
    recorded = {k: config.get(k) for k in _COMPARED if isinstance(config.get(k), dict)}
    if manifest.method != "conceptexpress":
        # Older manifests record the training config a method forced (BaS†: no split-and-merge), not the one
        # asked for; only the method is compared then.
        recorded.pop("TrainConfig", None)
    fine_tune = manifest.get("fine_tune")
    origin = fine_tune if isinstance(fine_tune, dict) else {}  # bas-ft: base_model is its own RUN/pipeline/
    user_masks = manifest.get("user_masks")
    return {
        "format": RUN_OPTIONS_FORMAT,
        "image_sha256": manifest.image_sha256,
        "model": origin.get("base_model", manifest.base_model),
        "single_file_config": origin.get("single_file_config", manifest.single_file_config),
        "method": manifest.method,
        "masks_sha256": user_masks.get("sha256") if isinstance(user_masks, dict) else None,
        "config": recorded,
    }


def option_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two :func:`run_options` objects, one short phrase each (``"TrainConfig.steps 4 → 2"``).

    Config fields present in only one of them (a field added by a later version) are not compared.
    """
    diffs = []
    if old.get("image_sha256") != new.get("image_sha256"):
        diffs.append("another image")
    if old.get("masks_sha256") != new.get("masks_sha256"):
        diffs.append("other masks (--masks)")
    for key in ("model", "single_file_config", "method"):
        if old.get(key) != new.get(key):
            diffs.append(f"{key} {old.get(key)!r} → {new.get(key)!r}")
    for name in _COMPARED:
        was, now = (old.get("config") or {}).get(name), (new.get("config") or {}).get(name)
        if not isinstance(was, dict) or not isinstance(now, dict):
            continue
        diffs += [f"{name}.{k} {was[k]!r} → {now[k]!r}" for k in now if k in was and was[k] != now[k]]
    return diffs


def clear_outputs(run_dir: str | Path, names: Iterable[str]) -> list[str]:
    """Remove ``names`` (files or folders) from ``run_dir``: all are renamed into a hidden folder inside it first
    (``manifest.json`` first, so the folder stops looking finished at once), then that folder is deleted.

    Leftovers of an interrupted earlier clear are deleted too. Returns the names that were present.

    Raises:
        OutputError: a name cannot be moved.
    """
    run = Path(run_dir)
    for stale in run.glob(f"{_OLD_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
    present = [n for n in dict.fromkeys(names) if (run / n).exists() or (run / n).is_symlink()]
    if not present:
        return []
    trash = Path(tempfile.mkdtemp(prefix=_OLD_PREFIX, dir=run))
    try:
        for name in sorted(present, key=lambda n: n != RUN_MANIFEST):
            os.replace(run / name, trash / name)
    except OSError as exc:
        raise OutputError(f"cannot clear the old run in '{run}': {name}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(trash, ignore_errors=True)
    return present
