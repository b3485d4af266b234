"""``conceptexpress evaluate RUNS [RUNS ...] [--out DIR] …``: paper Table 1 for folders of finished runs.

Flags come from :class:`~conceptexpress.config.EvalConfig` and
:class:`~conceptexpress.config.ModelConfig` (``--model`` / ``--single-file-config`` default to each run's manifest).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import EvalConfig, ModelConfig
from .args import add_config_args, add_run_model_args, config_from_args, given_options


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "evaluate",
        help="score finished runs with the paper's metrics (SIM^I, SIM^C, ACC^1, ACC^3; paper Table 1)",
        description="Generate test images with each run's tokens, SAM-mask the source concepts, and compute "
        "identity / compositional similarity and top-k concept classification accuracy with CLIP and DINO "
        "(paper §4.2). One table row per method (the runs' manifest `method`). Generated images and SAM "
        "masks are cached in RUN/eval/, so a second evaluation only recomputes the features.",
    )
    p.add_argument(
        "runs", nargs="+", type=Path, metavar="RUNS",
        help="folder holding one run folder per photo (RUNS/<name>/manifest.json), or a run folder",
    )
    p.add_argument("--out", type=Path, default=None, help="result folder (default: <parent of the first RUNS>/eval)")
    add_config_args(p, EvalConfig)
    add_run_model_args(p, "each run's, from its manifest.json")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..evaluate.protocol import evaluate_runs

    config = config_from_args(args, EvalConfig)
    options = given_options(args, ModelConfig)
    quiet = bool(getattr(args, "quiet", False))
    result = evaluate_runs(args.runs, config, out_dir=args.out, model_options=options, progress=not quiet)
    if not quiet:
        print(result.table, end="")
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    print(f"evaluated {result.summary['num_runs']} runs ({result.summary['num_concepts']} concepts{skipped}) -> "
          f"{result.out_dir}/ (table.md, summary.json, concepts.csv, images.csv)")
    return 0
