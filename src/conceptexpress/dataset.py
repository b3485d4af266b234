"""``conceptexpress extract-dataset FOLDER --out RUNS``: :func:`~conceptexpress.extract.extract` on every photo.

One run folder per photo, ``RUNS/<image stem>/`` (the layout of ``extract``). The command is restartable and
shardable without any coordination between processes:

- finished runs (``manifest.json`` with ``"complete": true`` for the same image bytes) are skipped, so rerunning
  the same command after a crash or Ctrl-C only does what is left;
- half-finished runs are continued with ``extract(..., resume=True)`` (localization reused, training continued
  from its last checkpoint);
- a photo that fails (bad file, no concept found, an unexpected exception) is recorded in
  ``RUNS/failures-rank<r>.json`` and the next photo starts; Ctrl-C stops the dataset;
- under a launcher (``torchrun``, ``accelerate launch``, ``srun``) each process takes every ``world_size``-th
  photo of the sorted list (:func:`shard`). The shards are disjoint, so processes never share a run folder and
  need no process group, barrier or collective; each writes its own ``summary-rank<r>.json`` and
  ``failures-rank<r>.json`` (per-rank files, even for one process, so no two processes ever write one file).

``docs/scaling.md`` shows the launcher commands.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from .config import LocalizeConfig, ModelConfig, TrainConfig
from .errors import ConfigError, InputError, OutputError

if TYPE_CHECKING:
    from .extract import SampleConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Suffixes Pillow reads on every platform; compared case-insensitively (``IMG_0001.JPG`` is common).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
SUMMARY_FORMAT = "conceptexpress-dataset-summary-1"


# ----------------------------------------------------------------------------- listing and sharding
def list_images(folder: str | Path) -> list[Path]:
    """The photos directly inside ``folder``, sorted by file name (code-point order, the same on every machine).

    Only files whose suffix is one of :data:`IMAGE_SUFFIXES` (any case) count. The search is not recursive:
    subfolders are ignored, so a runs folder placed inside the photo folder is never mistaken for input.
    Hidden files (name starting with ``.``) are ignored too; macOS writes ``._photo.jpg`` resource forks
    next to photos on external drives and they are not images.

    Raises:
        InputError: ``folder`` is missing, is not a folder, or holds no image.
    """
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"image folder '{folder}': no such folder")
    if not folder.is_dir():
        raise InputError(f"image folder '{folder}' is not a folder")
    images = [
        p
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
    ]
    if not images:
        kinds = ", ".join(s.lstrip(".") for s in IMAGE_SUFFIXES)
        raise InputError(f"image folder '{folder}' holds no image ({kinds}; subfolders are not searched)")
    return sorted(images, key=lambda p: p.name)


def check_unique_stems(images: Sequence[Path]) -> None:
    """Raise when two photos would share a run folder ``RUNS/<stem>`` (``a.png`` and ``a.jpg``).

    Stems are compared case-insensitively: ``Cat.png`` and ``cat.jpg`` would share a folder on macOS and
    Windows, where a runs folder may well be copied to.
    """
    seen: dict[str, Path] = {}
    for p in images:
        key = p.stem.casefold()
        if key in seen:
            raise InputError(
                f"images '{seen[key]}' and '{p}' would share the run folder '{p.stem}'; rename one of them"
            )
        seen[key] = p


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items ``rank, rank + world_size, rank + 2·world_size, …`` (round-robin over the given order).

    Round-robin rather than contiguous blocks: sorted file names often follow capture order or category
    (``cat_001 … cat_300, dog_001 …``), and neighbouring photos tend to cost the same (size, number of
    concepts), so interleaving spreads expensive stretches over all processes and the shards never differ
    by more than one item. The assignment depends only on the list, never on timing, so every process
    computes its own shard with no communication. Every item lands in exactly one shard.

    Raises:
        ConfigError: ``world_size < 1`` or ``rank`` outside ``[0, world_size)``.
    """
    _check_rank(rank, world_size, "rank", "world_size")
    return list(items[rank::world_size])


def _check_rank(rank: Any, world_size: Any, rank_name: str, world_name: str) -> None:
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ConfigError(f"`{world_name}` must be an integer >= 1, got {world_size!r}")
    if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
        raise ConfigError(
            f"`{rank_name}` must be an integer in [0, {world_size}) for {world_name}={world_size}, got {rank!r}"
        )


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value.strip())
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {value!r}") from None


def _launcher_vars(env: Mapping[str, str]) -> tuple[str, str] | None:
    """The (rank, world size) variable names the launcher set, or None outside a launcher."""
    if "RANK" in env or "WORLD_SIZE" in env:
        return "RANK", "WORLD_SIZE"
    if "SLURM_PROCID" in env:
        return "SLURM_PROCID", "SLURM_NTASKS"
    return None


def shard_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``(rank, world_size)`` of this process as set by its launcher, ``(0, 1)`` without one.

    ``torchrun`` and ``accelerate launch`` set ``RANK`` and ``WORLD_SIZE`` (and ``LOCAL_RANK``); Slurm's
    ``srun`` sets ``SLURM_PROCID`` and ``SLURM_NTASKS``, read only when ``RANK`` is absent (``torchrun``
    inside ``srun`` sets both, and then its own numbering is the one that counts). ``env`` defaults to
    ``os.environ``.

    Raises:
        ConfigError: a variable is not an integer, only one of a pair is set, or rank is not in
            ``[0, world_size)``.
    """
    env = os.environ if env is None else env
    names = _launcher_vars(env)
    if names is None:
        return 0, 1
    rank_name, world_name = names
    for name, other in ((rank_name, world_name), (world_name, rank_name)):
        if name not in env:
            raise ConfigError(f"environment variable {name} is missing while {other}={env[other]!r} is set")
    rank, world_size = _env_int(env, rank_name), _env_int(env, world_name)
    _check_rank(rank, world_size, rank_name, world_name)
    return rank, world_size


def local_rank_from_env(env: Mapping[str, str] | None = None) -> int:
    """This process's index on its machine: ``LOCAL_RANK`` (torchrun, accelerate), ``SLURM_LOCALID``, else 0."""
    env = os.environ if env is None else env
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if name in env:
            value = _env_int(env, name)
            if value < 0:
                raise ConfigError(f"environment variable {name} must be >= 0, got {value}")
            return value
    return 0


def process_model_config(model: ModelConfig, world_size: int, local_rank: int) -> ModelConfig:
    """``model`` with the device of this process: ``cuda:<local_rank>`` under a multi-process launch.

    With several processes per machine and ``--device auto`` or ``cuda``, every process would otherwise land
    on ``cuda:0``; launchers start one process per GPU and number them with ``LOCAL_RANK``. More processes
    than GPUs share them round-robin (with a warning). An explicit ``cuda:N``, ``cpu`` or ``mps`` is kept, and
    without CUDA (a CPU-only machine) there is nothing to place.
    """
    import torch

    if world_size <= 1 or model.device not in ("auto", "cuda") or not torch.cuda.is_available():
        return model
    count = torch.cuda.device_count()
    if local_rank >= count:
        logger.warning("local rank %d but only %d CUDA devices: processes share GPUs", local_rank, count)
    device = f"cuda:{local_rank % count}"
    # Later bare "cuda" tensors (the trainer's, the library's) must land on this GPU too, not on cuda:0.
    torch.cuda.set_device(local_rank % count)
    return replace(model, device=device)


# ----------------------------------------------------------------------------- the summary
@dataclass(frozen=True)
class DatasetSummary:
    """What one process did with its shard (written as ``RUNS/summary-rank<r>.json``).

    Image lists hold file names (``cat.png``) in processing order. ``resumed`` is the subset of ``done``
    that continued a half-finished run. ``sample_passes`` counts the UNet sample-passes of the runs finished
    by this call (a resumed run counts its whole training, as its manifest does); ``sample_passes_total``
    adds the skipped runs', i.e. the training cost of the whole shard.
    """

    folder: str
    runs_dir: str
    rank: int
    world_size: int
    method: str
    images: int  # photos in this shard
    done: tuple[str, ...]
    skipped: tuple[str, ...]
    failed: tuple[str, ...]
    resumed: tuple[str, ...]
    sample_passes: int
    sample_passes_total: int
    wall_s: float
    failures_file: str
    interrupted: bool = False  # Ctrl-C stopped the shard; the summary holds the photos handled before it
    started: str = ""  # ISO 8601, UTC
    finished: str = ""

    @property
    def ok(self) -> bool:
        """Every photo of the shard has a finished run (nothing failed, nothing left)."""
        return not self.failed and not self.interrupted

    def line(self) -> str:
        """One line for a log or a terminal."""
        who = f"rank {self.rank}/{self.world_size}: " if self.world_size > 1 else ""
        failed = f" ({', '.join(self.failed[:5])}{', …' if len(self.failed) > 5 else ''})" if self.failed else ""
        stop = "interrupted after " if self.interrupted else ""
        return (
            f"{who}{stop}{len(self.done)} done, {len(self.skipped)} skipped, {len(self.failed)} failed{failed} "
            f"of {self.images} images in {self.wall_s:.1f} s, {self.sample_passes} UNet sample-passes "
            f"-> {self.runs_dir}/"
        )

    def to_json(self) -> dict[str, Any]:
        counts = {"done": len(self.done), "skipped": len(self.skipped), "failed": len(self.failed)}
        return {"format": SUMMARY_FORMAT, **asdict(self), "counts": counts}


def summary_path(runs_dir: str | Path, rank: int) -> Path:
    return Path(runs_dir) / f"summary-rank{rank}.json"


def failures_path(runs_dir: str | Path, rank: int) -> Path:
    return Path(runs_dir) / f"failures-rank{rank}.json"


def merge_summaries(runs_dir: str | Path) -> dict[str, Any]:
    """Combine the ``summary-rank<r>.json`` files of the latest launch into one dict.

    The latest launch is the one of the most recently written summary; files of an earlier launch with a
    different number of processes (say ``summary-rank3.json`` of a 4-process run, then a 2-process rerun)
    are ignored and named under ``"ignored"``. ``"missing_ranks"`` lists ranks whose summary is absent
    (a process that crashed or is still running). Image lists are concatenated in rank order.
    """
    runs_dir = Path(runs_dir)
    found = []
    for path in sorted(runs_dir.glob("summary-rank*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if data.get("format") == SUMMARY_FORMAT:
            found.append((path, data))
    if not found:
        raise InputError(f"runs folder '{runs_dir}' holds no summary-rank*.json")
    latest = max(found, key=lambda pd: (pd[1].get("finished", ""), pd[0].stat().st_mtime_ns))[1]
    world = int(latest["world_size"])
    keep = sorted((d for _, d in found if d["world_size"] == world and d["rank"] < world), key=lambda d: d["rank"])
    merged: dict[str, Any] = {
        "runs_dir": str(runs_dir),
        "world_size": world,
        "ranks": [d["rank"] for d in keep],
        "missing_ranks": sorted(set(range(world)) - {d["rank"] for d in keep}),
        "ignored": [p.name for p, d in found if not (d["world_size"] == world and d["rank"] < world)],
        "failures_files": [d["failures_file"] for d in keep if d["failed"]],
        "interrupted": any(d.get("interrupted") for d in keep),
        "wall_s": max(d["wall_s"] for d in keep),  # processes run side by side
    }
    for key in ("done", "skipped", "failed", "resumed"):
        merged[key] = [name for d in keep for name in d[key]]
    for key in ("images", "sample_passes", "sample_passes_total"):
        merged[key] = sum(int(d[key]) for d in keep)
    return merged


# ----------------------------------------------------------------------------- one process's shard
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent, or not ours; atomic writes mean a half-written file cannot occur
    return data if isinstance(data, dict) else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:500]


class _TextSide:
    """Snapshot of the pipeline's tokenizer and input embeddings, restored after each photo.

    ``extract`` loads ``<c1>…<cN>`` into the tokenizer and text encoder to draw its samples and leaves them
    there. On a pipeline shared across photos the next photo's samples would then find ``<c1>`` already in the
    vocabulary and be drawn with the *previous* photo's tokens. Restoring the original state after each photo
    keeps every photo independent of the ones before it. transformers resizes the embedding *in place*
    (same module, new ``weight.data``, new ``num_embeddings``), so the snapshot holds the original weight
    tensor as well as the module.
    """

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.tokenizer = copy.deepcopy(pipe.tokenizer)
        self.size = len(pipe.tokenizer)
        self.module = pipe.text_encoder.get_input_embeddings()
        self.weight = self.module.weight.data  # the original rows, kept alive by this reference
        self.padding_idx = getattr(self.module, "padding_idx", None)
        self.vocab_size = getattr(pipe.text_encoder.config, "vocab_size", None)

    def restore(self) -> None:
        pipe = self.pipe
        if len(pipe.tokenizer) != self.size:
            pipe.tokenizer = copy.deepcopy(self.tokenizer)  # a copy: the next photo may add tokens again
        if pipe.text_encoder.get_input_embeddings() is not self.module:
            pipe.text_encoder.set_input_embeddings(self.module)
        weight = self.module.weight
        if weight.shape != self.weight.shape or weight.data_ptr() != self.weight.data_ptr():
            self.module.weight.data = self.weight
            self.module.weight.grad = None  # a gradient of the resized table no longer fits
            self.module.num_embeddings = self.weight.shape[0]
            self.module.padding_idx = self.padding_idx
        if self.vocab_size is not None:
            pipe.text_encoder.config.vocab_size = self.vocab_size


def _mismatch(run: Path, image: Path, recorded: str, sha: str, what: str) -> OutputError:
    return OutputError(
        f"run folder '{run}' holds a {what} run of another image (sha256 {recorded[:12]}…, '{image.name}' is "
        f"{sha[:12]}…); move the folder away or choose another --out"
    )


# Training options a method forces whatever was asked (learn/bas.py: BaS† has no split-and-merge and no
# contrastive loss); a manifest records the config actually used, so these are compared as forced.
_METHOD_FORCES: dict[str, dict[str, Any]] = {"bas-dagger": {"split_merge": False, "contrastive": False}}


def _config_differences(manifest: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """Names of the options a finished run was made with that differ from the ones asked for now."""
    recorded = manifest.get("config", {})
    wanted = {**wanted, "TrainConfig": {**wanted["TrainConfig"], **_METHOD_FORCES.get(wanted["method"], {})}}
    diffs = [k for k in ("LocalizeConfig", "TrainConfig") if k in recorded and recorded[k] != wanted[k]]
    if recorded.get("ModelConfig", {}).get("model") not in (None, wanted["ModelConfig"]["model"]):
        diffs.append("model")
    if manifest.get("method", "conceptexpress") != wanted["method"]:
        diffs.append("method")
    return diffs


def extract_dataset(
    folder: str | Path,
    runs_dir: str | Path,
    *,
    model: ModelConfig | None = None,
    localize: LocalizeConfig | None = None,
    train: TrainConfig | None = None,
    sample: SampleConfig | None = None,
    method: str = "conceptexpress",
    rank: int | None = None,
    world_size: int | None = None,
    progress: bool = True,
    pipe=None,
) -> DatasetSummary:
    """Run :func:`~conceptexpress.extract.extract` on this process's shard of the photos in ``folder``.

    Each photo gets the run folder ``runs_dir/<stem>``. ``rank``/``world_size`` default to the launcher's
    environment (:func:`shard_from_env`), else a single process. The pipeline is loaded once per process
    (``load_pipeline(model)``, on ``cuda:LOCAL_RANK`` under a multi-GPU launch, see
    :func:`process_model_config`), and only when some photo of the shard still needs work; pass ``pipe`` to
    use one already loaded (kept where it is).

    Per photo: a finished run of the same image bytes is skipped; a half-finished one is continued
    (``resume=True``); a run folder holding another image's run is a failure; any error of the photo is
    recorded in ``runs_dir/failures-rank<r>.json`` (rewritten after each failure) and the next photo starts.
    Errors that concern every photo (no photo, colliding stems, bad option, model that does not load,
    unwritable ``runs_dir``) are raised before or instead of per-photo work. ``KeyboardInterrupt`` writes the
    summary (``interrupted``) and propagates.

    Returns:
        The :class:`DatasetSummary`, also written atomically to ``runs_dir/summary-rank<r>.json``.
    """
    from .config import config_dict
    from .extract import METHODS, SampleConfig, extract, file_sha256
    from .io.atomic import atomic_write_json, ensure_output_dir
    from .io.images import load_image

    started_at = time.perf_counter()
    started = datetime.now(UTC).isoformat(timespec="seconds")
    model = model or ModelConfig()
    localize = localize or LocalizeConfig()
    train = train or TrainConfig()
    sample = sample or SampleConfig()

    # 1. Everything that concerns the whole dataset fails here, before any photo is touched.
    if method not in METHODS:
        raise ConfigError(f"`method` must be one of {', '.join(METHODS)}, got {method!r}")
    if (rank is None) != (world_size is None):
        raise ConfigError(
            f"give both `rank` and `world_size` or neither, got rank={rank!r}, world_size={world_size!r}"
        )
    if rank is None:
        rank, world_size = shard_from_env()
        names = _launcher_vars(os.environ)
        if names:
            logger.info("shard from the launcher: %s=%d, %s=%d", names[0], rank, names[1], world_size)
    assert world_size is not None
    _check_rank(rank, world_size, "rank", "world_size")
    images = list_images(folder)
    check_unique_stems(images)  # over all photos, not the shard: every process reaches the same verdict
    mine = shard(images, rank, world_size)
    runs = ensure_output_dir(runs_dir)
    fail_file = failures_path(runs, rank)
    wanted = {**config_dict(model, localize, train), "method": method}
    who = f"rank {rank}/{world_size}: " if world_size > 1 else ""
    logger.info("%s%d of %d images in '%s' -> '%s'", who, len(mine), len(images), folder, runs)

    done: list[str] = []
    skipped: list[str] = []
    failed: list[str] = []
    resumed: list[str] = []
    failures: list[dict[str, str]] = []
    passes = {"done": 0, "skipped": 0}
    text_side: _TextSide | None = None

    def write_failures() -> None:
        # Rewritten in full after each failure (and once at the start), so a crash loses none and a rerun
        # that fixes a photo does not leave its old failure behind.
        atomic_write_json(fail_file, {"rank": rank, "world_size": world_size, "failures": failures})

    def summary(interrupted: bool) -> DatasetSummary:
        return DatasetSummary(
            folder=str(folder), runs_dir=str(runs), rank=rank, world_size=world_size, method=method,
            images=len(mine), done=tuple(done), skipped=tuple(skipped), failed=tuple(failed),
            resumed=tuple(resumed), sample_passes=passes["done"],
            sample_passes_total=passes["done"] + passes["skipped"],
            wall_s=round(time.perf_counter() - started_at, 3), failures_file=str(fail_file),
            interrupted=interrupted, started=started,
            finished=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    write_failures()
    bar = _bar(len(mine), rank, world_size, progress)
    # Log lines go through tqdm.write while the bar is shown, so they do not tear it apart.
    logs = _redirect_logs(bar)
    try:
        for image in mine:
            run = runs / image.stem
            try:
                # 2. Finished, half-finished, or another image's? Decided from the files each stage writes last.
                try:
                    status, manifest = _run_status(run, image, file_sha256(image))
                    if status != "finished":
                        # Decoding is cheap next to training: a broken photo fails here, and a rerun that
                        # finds only broken photos left never loads the model.
                        load_image(image)
                except Exception as exc:  # a bad photo or a foreign run folder: this photo only
                    _record(failures, failed, image, run, exc)
                    write_failures()
                    continue
                if status == "finished":
                    diffs = _config_differences(manifest, wanted)
                    if diffs:
                        logger.warning("%s: skipped, finished with other options (%s); delete '%s' to redo it",
                                       image.name, ", ".join(diffs), run)
                    skipped.append(image.name)
                    passes["skipped"] += int(manifest.get("sample_passes") or 0)
                    continue

                # 3. The model, once per process and only when a photo needs it. A model that does not load
                # concerns every photo: raised, not recorded.
                if pipe is None:
                    from .models import load_pipeline

                    model = process_model_config(model, world_size, local_rank_from_env())
                    pipe = load_pipeline(model)
                if text_side is None:
                    text_side = _TextSide(pipe)

                # 4. The photo. Any failure is recorded and the next photo starts; Ctrl-C is no Exception.
                try:
                    out = extract(
                        image, run, model=model, localize=localize, train=train, sample=sample,
                        resume=status == "partial", pipe=pipe, method=method,
                        progress=progress and world_size == 1,  # one process: its training bar nests below
                    )
                except Exception as exc:
                    logger.debug("%s failed", image, exc_info=True)
                    _record(failures, failed, image, run, exc)
                    write_failures()
                    _free_accelerator_memory()
                else:
                    done.append(image.name)
                    if status == "partial":
                        resumed.append(image.name)
                    passes["done"] += int(out.get("sample_passes") or 0)
                    logger.info("%s: %d concepts -> %s", image.name, out.get("num_concepts", 0), run)
                finally:
                    text_side.restore()
            finally:
                _bar_update(bar, done, skipped, failed)
    except KeyboardInterrupt:
        # Not swallowed: the dataset stops. The summary says how far it got; finished runs stay, and the
        # same command skips them next time.
        _close(bar, logs)
        stopped = summary(interrupted=True)
        atomic_write_json(summary_path(runs, rank), stopped.to_json())
        logger.warning("%s", stopped.line())
        raise
    _close(bar, logs)
    result = summary(interrupted=False)
    atomic_write_json(summary_path(runs, rank), result.to_json())
    # Tagged so the command line, which prints this line itself, can leave it out of its log.
    logger.log(logging.WARNING if failed else logging.INFO, "%s", result.line(), extra={"dataset_summary": True})
    return result


def _run_status(run: Path, image: Path, sha: str) -> tuple[str, dict[str, Any]]:
    """``("finished", manifest)``, ``("partial", {})`` or ``("new", {})`` for the run folder of ``image``.

    Raises:
        OutputError: the folder holds a run (finished or not) of different image bytes, e.g. a photo of the
            same name from another folder written to the same ``--out``.
    """
    from .extract import RUN_MANIFEST
    from .io.localization_files import MANIFEST as LOCALIZATION_MANIFEST

    manifest = _read_json(run / RUN_MANIFEST)
    if manifest is not None and manifest.get("complete") is True:
        if manifest.get("image_sha256") != sha:
            raise _mismatch(run, image, str(manifest.get("image_sha256")), sha, "finished")
        return "finished", manifest
    loc = _read_json(run / LOCALIZATION_MANIFEST)
    if loc is not None and loc.get("image_sha256") not in (None, sha):
        raise _mismatch(run, image, str(loc["image_sha256"]), sha, "half-finished")
    return ("partial" if loc is not None or (run / "checkpoints").is_dir() else "new"), {}


def _record(failures: list[dict[str, str]], failed: list[str], image: Path, run: Path, exc: BaseException) -> None:
    failures.append({"image": str(image), "run": str(run), "error": type(exc).__name__, "message": _one_line(exc)})
    failed.append(image.name)
    logger.warning("%s: failed: %s: %s", image.name, type(exc).__name__, _one_line(exc))


def _free_accelerator_memory() -> None:
    # A failure mid-training (CUDA out of memory, say) leaves its activations to the caching allocator; hand
    # them back so the next photo starts from the same free memory as the first.
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _bar(total: int, rank: int, world_size: int, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    # One line per process: `position` keeps the bars of a multi-process launch on separate terminal rows.
    return tqdm(total=total, desc=f"rank {rank} images" if world_size > 1 else "images", unit="image",
                position=rank if world_size > 1 else None, dynamic_ncols=True)


def _redirect_logs(bar) -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    if bar is not None:
        from tqdm.contrib.logging import logging_redirect_tqdm

        stack.enter_context(logging_redirect_tqdm())
    return stack


def _close(bar, logs: contextlib.ExitStack) -> None:
    logs.close()
    if bar is not None:
        bar.close()


def _bar_update(bar, done: list[str], skipped: list[str], failed: list[str]) -> None:
    if bar is None:
        return
    bar.update(len(done) + len(skipped) + len(failed) - bar.n)
    bar.set_postfix(done=len(done), skipped=len(skipped), failed=len(failed))


# ----------------------------------------------------------------------------- command line
def add_extract_dataset_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``extract-dataset FOLDER --out RUNS …`` to the ``conceptexpress`` sub-commands."""
    from .cli import add_config_args
    from .extract import METHODS, SampleConfig

    p = subparsers.add_parser(
        "extract-dataset",
        help="extract every photo of a folder (one run folder each; resumable; shards under torchrun/accelerate)",
        description="Run `extract` on every image directly in FOLDER (png, jpg, jpeg, webp, bmp, tif, tiff; not "
        "recursive) into RUNS/<image name>/. Finished runs are skipped and half-finished ones continued, so "
        "rerunning the same command resumes. Under torchrun, accelerate launch or srun each process takes "
        "every WORLD_SIZE-th image and its own GPU (docs/scaling.md). Exit code 1 when a photo failed (see "
        "RUNS/failures-rank<r>.json); under a multi-process launch 0, since a non-zero exit makes the launcher "
        "stop the other processes.",
    )
    p.add_argument("folder", help="folder of photos (not searched recursively)")
    p.add_argument("--out", type=Path, required=True, help="runs folder: one run folder per photo, summaries, failures")
    p.add_argument("--method", choices=METHODS, default="conceptexpress",
                   help="token learning: ConceptExpress (default) or the BaS† baseline of paper §4.1 on the same masks")
    p.add_argument("--rank", type=int, default=None,
                   help="this process's shard (default: RANK or SLURM_PROCID from the launcher, else 0)")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of shards (default: WORLD_SIZE or SLURM_NTASKS from the launcher, else 1)")
    add_config_args(p, ModelConfig)
    add_config_args(p, LocalizeConfig)
    add_config_args(p, TrainConfig)
    add_config_args(p, SampleConfig)
    p.set_defaults(func=_cmd_extract_dataset)
    return p


class _DropSummary(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "dataset_summary", False)


def _cmd_extract_dataset(args: argparse.Namespace) -> int:
    """0 when every photo of this process's shard is done or skipped, 1 when some failed (one process).

    Under a multi-process launch a process whose photos failed still exits 0 once its shard is through:
    torchrun and accelerate treat a non-zero exit as a crashed worker and kill every other process at once
    (SIGTERM), so one broken JPEG would stop the whole dataset, and again on every rerun. The failures are in
    the summary and ``failures-rank<r>.json`` files (``merge_summaries``).
    """
    from .cli import config_from_args
    from .extract import SampleConfig

    if (args.rank is None) != (args.world_size is None):
        raise ConfigError(
            f"give both --rank and --world-size or neither, got --rank {args.rank} --world-size {args.world_size}"
        )
    quiet_summary = _DropSummary()
    logger.addFilter(quiet_summary)  # printed below; logged too it would show twice
    try:
        summary = extract_dataset(
            args.folder,
            args.out,
            model=config_from_args(args, ModelConfig),
            localize=config_from_args(args, LocalizeConfig),
            train=config_from_args(args, TrainConfig),
            sample=config_from_args(args, SampleConfig),
            method=args.method,
            rank=args.rank,
            world_size=args.world_size,
            progress=not getattr(args, "quiet", False),
        )
    finally:
        logger.removeFilter(quiet_summary)
    print(summary.line())
    if summary.failed:
        print(f"failures: {summary.failures_file}")
        return 1 if summary.world_size == 1 else 0
    return 0
