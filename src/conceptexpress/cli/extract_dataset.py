"""``conceptexpress extract-dataset``: the sub-command's flags (from the configs) and its handler."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..config import LocalizeConfig, ModelConfig, RuntimeConfig, SampleConfig, TrainConfig
from ..errors import ConfigError
from .args import add_config_args
from .extract import add_method_arg, run_config_from_args

logger = logging.getLogger("conceptexpress.dataset")  # the logger extract_dataset writes its summary line to


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``extract-dataset FOLDER --out RUNS …`` to the ``conceptexpress`` sub-commands."""
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
    add_method_arg(p, supervised=False)  # bas / bas-ft need one mask folder per photo: `extract` them one by one
    p.add_argument("--overwrite", action="store_true",
                   help="replace a photo's run folder holding a run of another image or of other options (finished "
                   "or not) instead of skipping it (finished) or failing it")
    p.add_argument("--rank", type=int, default=None,
                   help="this process's shard (default: RANK or SLURM_PROCID from the launcher, else 0)")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of shards (default: WORLD_SIZE or SLURM_NTASKS from the launcher, else 1)")
    for cls in (ModelConfig, LocalizeConfig, TrainConfig, RuntimeConfig, SampleConfig):
        add_config_args(p, cls, skip=("init_words",) if cls is TrainConfig else ())  # words are per photo
    p.set_defaults(func=run)
    return p


class _DropSummary(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "dataset_summary", False)


def run(args: argparse.Namespace) -> int:
    """0 when every photo of this process's shard is done or skipped, 1 when some failed (one process).

    Under a multi-process launch a process whose photos failed still exits 0 once its shard is through:
    torchrun and accelerate treat a non-zero exit as a crashed worker and kill every other process at once
    (SIGTERM), so one broken JPEG would stop the whole dataset, and again on every rerun. The failures are in
    the summary and ``failures-rank<r>.json`` files (``merge_summaries``).
    """
    from ..dataset import extract_dataset

    if (args.rank is None) != (args.world_size is None):
        raise ConfigError(
            f"give both --rank and --world-size or neither, got --rank {args.rank} --world-size {args.world_size}"
        )
    quiet_summary = _DropSummary()
    logger.addFilter(quiet_summary)  # printed below; logged too it would show twice
    try:
        summary = extract_dataset(args.folder, args.out, run_config_from_args(args), rank=args.rank,
                                  world_size=args.world_size)
    finally:
        logger.removeFilter(quiet_summary)
    print(summary.line())
    if summary.failed:
        print(f"failures: {summary.failures_file}")
        return 1 if summary.world_size == 1 else 0
    return 0
