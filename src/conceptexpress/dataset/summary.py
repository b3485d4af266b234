"""What one process did with its shard: :class:`DatasetSummary`, the per-rank summary and failure files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError

SUMMARY_FORMAT = "conceptexpress-dataset-summary-1"


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
