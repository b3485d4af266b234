"""``conceptexpress evaluate RUNS [RUNS ...] [--out DIR] …``: paper Table 1 for folders of finished runs.

Flags come from :class:`~conceptexpress.evaluate.protocol.EvalConfig` and
:class:`~conceptexpress.config.ModelConfig` (``--model`` / ``--single-file-config`` default to each run's manifest).
"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["add_evaluate_parser"]


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``evaluate`` on ``subparsers`` (from ``add_subparsers``); its ``func`` returns the exit code."""
    from ..cli import add_config_args, add_run_model_args
    from .protocol import EvalConfig

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
    p.set_defaults(func=_cmd_evaluate)
    return p


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from ..cli import config_from_args
    from ..config import ModelConfig
    from .protocol import EvalConfig, evaluate_runs

    config = config_from_args(args, EvalConfig)
    prefix = ModelConfig.__name__ + "."
    options = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}
    quiet = bool(getattr(args, "quiet", False))
    result = evaluate_runs(args.runs, config, out_dir=args.out, model_options=options, progress=not quiet)
    if not quiet:
        print(result.table, end="")
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    print(f"evaluated {result.summary['num_runs']} runs ({result.summary['num_concepts']} concepts{skipped}) -> "
          f"{result.out_dir}/ (table.md, summary.json, concepts.csv, images.csv)")
    return 0
