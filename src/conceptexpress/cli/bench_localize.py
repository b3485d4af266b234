"""``conceptexpress bench-localize DATASET [--out DIR] [--make-synthetic N | --from-clevr SRC] [options]``.

Flags come from :class:`~conceptexpress.config.BenchConfig`, ``ModelConfig`` and ``LocalizeConfig``
(``--n-max`` is ours' N_max).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import BenchConfig, LocalizeConfig, ModelConfig
from ..errors import ConfigError
from .args import add_config_args, config_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``bench-localize`` on ``subparsers`` (from ``add_subparsers``)."""
    p = subparsers.add_parser(
        "bench-localize",
        help="score concept localization against ground-truth masks (paper §4.5, Table 3, Fig. 7)",
        description="Compare our localization with k-means and FINCH at fixed cluster counts on the same "
        "attention, matched to ground-truth instance masks (IoU, Recall, Precision). DATASET holds images/<name>.png "
        "and masks/<name>.png (label map, 0 = background) or masks/<name>/<k>.png; see "
        "docs/localization-benchmark.md.",
    )
    p.add_argument("dataset", type=Path, metavar="DATASET", help="dataset folder (images/ and masks/)")
    p.add_argument(
        "--out", type=Path, default=None, help="output folder (default: outputs/bench-<DATASET name>)"
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--make-synthetic",
        type=int,
        default=None,
        metavar="N",
        help="first write N synthetic CLEVR-style scenes into DATASET (must not hold images yet)",
    )
    source.add_argument(
        "--from-clevr",
        type=Path,
        default=None,
        metavar="SRC",
        help="first convert SRC/images + SRC/masks (one colour per instance) into DATASET",
    )
    p.add_argument(
        "--clevr-background",
        default="auto",
        metavar="BG",
        help="background of --from-clevr masks: auto (most frequent border colour), an index, or r,g,b "
        "(default: auto)",
    )
    add_config_args(p, BenchConfig)
    add_config_args(p, ModelConfig)
    add_config_args(p, LocalizeConfig)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..io.atomic import ensure_output_dir
    from ..locbench.dataset import convert_clevr_masks, load_dataset, parse_background
    from ..locbench.run import RESULTS, TABLE, bench_localize
    from ..locbench.scenes import write_synthetic_dataset
    from ..models import load_pipeline

    # Cheap checks first: options, dataset and output folder fail before the model loads.
    bench = config_from_args(args, BenchConfig)
    model_cfg = config_from_args(args, ModelConfig)
    loc_cfg = config_from_args(args, LocalizeConfig)
    if args.make_synthetic is not None:
        if args.make_synthetic < 1:
            raise ConfigError(f"`--make-synthetic` must be >= 1, got {args.make_synthetic}")
        write_synthetic_dataset(args.dataset, args.make_synthetic, seed=bench.seed)
    elif args.from_clevr is not None:
        convert_clevr_masks(args.from_clevr, args.dataset, background=parse_background(args.clevr_background))
    samples = load_dataset(args.dataset, limit=bench.limit)
    out = ensure_output_dir(args.out or Path("outputs") / f"bench-{args.dataset.resolve().name}")

    pipe = load_pipeline(model_cfg)
    results = bench_localize(
        args.dataset,
        bench,
        pipe=pipe,
        localize_config=loc_cfg,
        out_dir=out,
        progress=not getattr(args, "quiet", False),
    )
    s = results["summary"]["ours"]
    print(
        f"scored {len(samples)} image{'s' if len(samples) != 1 else ''}: ours IoU {100 * s['iou']:.1f} / Recall {100 * s['recall']:.1f} / Precision "
        f"{100 * s['precision']:.1f} -> {out / TABLE}, {out / RESULTS}"
    )
    return 0
