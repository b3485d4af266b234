"""Finding the finished runs of a dataset folder: ``RUNS/<image stem>/manifest.json`` (written by ``extract``).

A RUNS folder holds one run folder per photo. A run is evaluated when its manifest says ``"complete": true``, its
source photo still exists with the hash the manifest records, and every token has a mask of the photo's size;
any other folder is skipped with one warning line (and listed in ``summary.json``), so a dataset with a few
failed photos still evaluates. When no run is left, nothing is skipped: the refusal is one error that says why
(the run's own error when there was one run). A folder that is itself a run (has ``manifest.json``) is accepted as a dataset of
one run. Hidden folders and the output folder are ignored.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import InputError
from ..io.checked import file_sha256, resolve_inside
from ..io.images import load_image
from ..io.manifest import RunManifest
from ..io.run_folder import RunFolder, read_manifest

__all__ = ["DEFAULT_METHOD", "EvalRun", "discover_runs", "load_masks", "load_source"]

logger = logging.getLogger(__name__)


# Runs written before `extract --method` existed are ConceptExpress runs.
DEFAULT_METHOD = "conceptexpress"


@dataclass(frozen=True)
class EvalRun:
    """One finished run to evaluate."""

    path: Path  # the run folder
    label: str  # "<RUNS folder name>/<run folder name>", unique within one evaluation
    method: str  # manifest "method": "conceptexpress", "bas-dagger", …
    manifest: RunManifest
    image: Path  # the source photo
    image_sha256: str
    masks: tuple[Path, ...]  # one per token, manifest order

    @property
    def tokens(self) -> list[str]:
        return [entry["token"] for entry in self.manifest["tokens"]]


def _sha256(path: Path) -> str:
    return file_sha256(path)


def _check_run(run: Path, label: str) -> EvalRun:
    """The run at ``run`` if it can be evaluated; InputError (one line) saying why not otherwise."""
    manifest = read_manifest(run)
    if isinstance(manifest.get("source_image"), str):
        # The photo's bytes inside the run folder (runs since the run-folder hardening): nothing outside is read.
        image = resolve_inside(run, manifest["source_image"], source=run / RunFolder.MANIFEST)
    else:  # a run of an earlier version: the photo at its recorded path, used only if its SHA-256 still matches
        image = Path(str(manifest.get("image", "")))
    if not manifest.get("image") and not manifest.get("source_image") or not image.is_file():
        raise InputError(f"run {str(run)!r}: its source photo {str(image)!r} is missing")
    sha = _sha256(image)
    if manifest.get("image_sha256") and manifest["image_sha256"] != sha:
        raise InputError(f"run {str(run)!r}: the photo {str(image)!r} changed since extraction (sha256 differs)")
    size = load_image(image).size  # (W, H) as displayed, EXIF orientation applied like `extract`
    masks = []
    for entry in manifest["tokens"]:
        rel = entry.get("mask")
        path = (run / str(rel)).resolve() if isinstance(rel, str) else None
        if path is None or not path.is_file():
            raise InputError(f"run {str(run)!r}: token {entry['token']!r} has no mask file ({rel!r})")
        with Image.open(path) as im:
            if im.size != size:
                raise InputError(
                    f"run {str(run)!r}: mask {rel!r} is {im.size[0]}x{im.size[1]}, the photo is {size[0]}x{size[1]}"
                )
        masks.append(path)
    return EvalRun(run, label, method_label(manifest), manifest, image, sha, tuple(masks))


def method_label(manifest: dict) -> str:
    """Table row of a run: its ``method``, plus the ablations it was trained with (paper Table 2).

    ConceptExpress runs trained with ``--no-split-merge`` / ``--no-attn-reg`` / ``--no-contrastive`` get their own
    rows (``conceptexpress -SnM -Reg`` …), so the ablation switches reproduce Table 2 with one `evaluate` call.
    The contrastive loss only exists with split-and-merge, so ``-Con`` is not shown when ``-SnM`` is. Runs given
    the user's masks or initializer words get ``+masks`` / ``+words`` (``bas-ft +masks +words`` is Table 1's
    "BaS f.t.").
    """
    method = str(manifest.get("method") or DEFAULT_METHOD)
    train = (manifest.get("config") or {}).get("TrainConfig") or {}
    # Supervision (user masks, initializer words) makes its own rows: paper Fig. 8's "+ mask", "+ initializer".
    given = [name for name, on in (("masks", manifest.get("user_masks")), ("words", train.get("init_words"))) if on]
    supervision = [f"+{name}" for name in given]
    if method != DEFAULT_METHOD:
        return " ".join([method, *supervision])
    off = [name for key, name in (("split_merge", "SnM"), ("attn_reg", "Reg"), ("contrastive", "Con")) if train.get(key) is False]
    if "SnM" in off and "Con" in off:
        off.remove("Con")
    return " ".join([method, *supervision, *(f"-{name}" for name in off)])


def discover_runs(
    runs_dirs: list[str | Path], *, exclude: tuple[Path, ...] = ()
) -> tuple[list[EvalRun], list[dict[str, str]]]:
    """The runs of every RUNS folder, in folder order then name order, and the skipped ones.

    Returns:
        ``(runs, skipped)``; ``skipped`` holds ``{"path": …, "reason": …}`` for every run folder that cannot be
        evaluated (each also logged as a warning).

    Raises:
        InputError: a RUNS folder does not exist, or no run at all can be evaluated: the one candidate's own error
            (e.g. RunFolderError for a manifest naming a file outside its folder), else one line with the reasons.
    """
    if isinstance(runs_dirs, str | Path) or not runs_dirs:
        raise InputError(f"pass at least one RUNS folder, got {runs_dirs!r}")
    excluded = {p.resolve() for p in exclude}
    runs: list[EvalRun] = []
    skipped: list[dict[str, str]] = []
    errors: list[InputError] = []  # of the skipped candidates: re-raised when it is the only one
    skip_lines: list[str] = []  # one line per skipped candidate, logged once some run is left to evaluate
    seen: set[Path] = set()
    for root in map(Path, runs_dirs):
        if not root.is_dir():
            raise InputError(f"RUNS folder {str(root)!r} does not exist or is not a folder")
        if (root / RunFolder.MANIFEST).is_file():
            candidates = [(root, root.resolve().name)]
        else:
            candidates = [
                (d, f"{root.resolve().name}/{d.name}")
                for d in sorted(root.iterdir())
                if d.is_dir() and not d.name.startswith(".") and d.resolve() not in excluded
            ]
        for run, label in candidates:
            if run.resolve() in seen:
                continue
            seen.add(run.resolve())
            if not (run / RunFolder.MANIFEST).is_file():
                reason = "no manifest.json (not a run, or the run did not finish)"
                skipped.append({"path": str(run), "reason": reason})
                skip_lines.append(f"{run}: {reason}")
                continue
            try:
                runs.append(_check_run(run, label))
            except InputError as exc:
                skipped.append({"path": str(run), "reason": str(exc)})
                skip_lines.append(str(exc))  # names the run
                errors.append(exc)
    if not runs:  # a refusal, in one line: no "skipping" warning before it
        where = ", ".join(repr(str(p)) for p in runs_dirs)
        if len(skipped) == 1 and errors:
            raise errors[0]
        if errors:
            reasons = "; ".join(skip_lines[:3]) + ("; …" if len(skip_lines) > 3 else "")
            raise InputError(f"no run to evaluate in {where}: {len(skipped)} run folders skipped ({reasons})")
        raise InputError(f"no finished run to evaluate in {where} (expected RUNS/<name>/manifest.json from `extract`)")
    for line in skip_lines:
        logger.warning("skipping %s", line)
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        # Two RUNS folders with the same name: fall back to full paths so rows stay distinguishable.
        runs = [EvalRun(r.path, str(r.path), r.method, r.manifest, r.image, r.image_sha256, r.masks) for r in runs]
    return runs, skipped


def load_source(run: EvalRun):
    """The run's source photo as RGB PIL (EXIF orientation applied, as ``extract`` saw it)."""
    return load_image(run.image)


def load_masks(run: EvalRun) -> list[np.ndarray]:
    """The run's concept masks, ``(H, W)`` bool each (PNG value > 127)."""
    out = []
    for path in run.masks:
        with Image.open(path) as im:
            out.append(np.asarray(im.convert("L")) > 127)
    return out
