"""What makes a run *this* run: the JSON object of ``RUN/run.json``, and how two of them differ.

A rerun of ``extract`` into a folder is either a resume of the run there or a new run, never a mix: its options
(:func:`run_options`) are compared (:func:`option_differences`) with the ones the folder's run was started with
(``run.json``, written before any training; for runs of earlier versions the finished ``manifest.json``,
:func:`options_of_manifest`). Options are the image bytes, the base
model, the method, the user's masks (``--masks``, by SHA-256) and the method's configs (``LocalizeConfig``,
``TrainConfig``, ``FineTuneConfig`` for ``bas-ft``); how the work runs
(``RuntimeConfig``) and the samples drawn after training (``SampleConfig``) are not part of them.

Reading, writing and acting on them (refusing, or clearing the old run) is
:meth:`RunFolder.start_run <conceptexpress.io.run_folder.RunFolder.start_run>`. Pure functions on dicts here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import RunFolderError
from .manifest import RunManifest

__all__ = ["check_run_options", "model_record", "option_differences", "options_of_manifest", "run_options"]

RUN_OPTIONS_FORMAT = "conceptexpress-run-options-1"  # run.json's "format"
COMPARED = ("LocalizeConfig", "TrainConfig", "FineTuneConfig")  # the ones a run records (FineTune: bas-ft)


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
        "config": {name: dict(configs[name]) for name in COMPARED if name in configs},
    }


def options_of_manifest(manifest: RunManifest) -> dict[str, Any]:
    """The :func:`run_options` of a finished run written before ``run.json`` existed, from its manifest."""
    config = manifest.get("config") or {}
    recorded = {k: config.get(k) for k in COMPARED if isinstance(config.get(k), dict)}
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


def check_run_options(data: Mapping[str, Any], *, source: str) -> dict[str, Any]:
    """``data`` (read from ``run.json``, named ``source``) if it is a :func:`run_options` object.

    Raises:
        RunFolderError: it is not (another format, a config or entry missing or of the wrong type).
    """
    config = data.get("config")
    if data.get("format") != RUN_OPTIONS_FORMAT or not isinstance(config, dict) or not all(
        isinstance(config.get(k), dict) for k in COMPARED[:2]
    ) or not all(isinstance(data.get(k), str) for k in ("image_sha256", "model", "method")):
        raise RunFolderError(f"{source!r} is damaged: not a {RUN_OPTIONS_FORMAT} object")
    return dict(data)


def model_record(model: str) -> str:
    """How a run records its model: a local path made absolute (so ``generate`` finds it from any working
    directory), a hub id as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


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
    for name in COMPARED:
        was, now = (old.get("config") or {}).get(name), (new.get("config") or {}).get(name)
        if not isinstance(was, dict) or not isinstance(now, dict):
            continue
        diffs += [f"{name}.{k} {was[k]!r} → {now[k]!r}" for k in now if k in was and was[k] != now[k]]
    return diffs
