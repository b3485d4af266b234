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

Layout: ``shards.py`` (listing, sharding, launcher environment), ``summary.py`` (:class:`DatasetSummary`, the
per-rank files), ``run.py`` (:func:`extract_dataset`); the sub-command is ``conceptexpress.cli.extract_dataset``.
"""

from __future__ import annotations

from .run import extract_dataset
from .shards import (
    IMAGE_SUFFIXES,
    check_unique_stems,
    list_images,
    local_rank_from_env,
    process_model_config,
    shard,
    shard_from_env,
)
from .summary import SUMMARY_FORMAT, DatasetSummary, failures_path, merge_summaries, summary_path

__all__ = [
    "IMAGE_SUFFIXES",
    "SUMMARY_FORMAT",
    "DatasetSummary",
    "check_unique_stems",
    "extract_dataset",
    "failures_path",
    "list_images",
    "local_rank_from_env",
    "merge_summaries",
    "process_model_config",
    "shard",
    "shard_from_env",
    "summary_path",
]
