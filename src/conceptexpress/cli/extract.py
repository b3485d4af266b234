"""``conceptexpress extract IMAGE [--out DIR] [--resume] …``: localize one photo and learn one token per concept."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import METHODS, LocalizeConfig, ModelConfig, RuntimeConfig, SampleConfig, TrainConfig
from ..extract import extract
from .args import add_config_args, config_from_args


def add_method_arg(p: argparse.ArgumentParser) -> None:
    """``--method conceptexpress|bas-dagger`` (shared with ``extract-dataset``)."""
    p.add_argument(
        "--method",
        choices=METHODS,
        default="conceptexpress",
        help="token learning: ConceptExpress (default) or the BaS† baseline of paper §4.1 on the same masks",
    )


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("extract", help="localize the concepts of one photo and learn one token each (paper §3)")
    p.add_argument("image", help="the photo (PNG, JPEG, WebP, …)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: outputs/<image name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run folder's last checkpoint (runtime options such as --micro-batch may differ)")
    p.add_argument("--overwrite", action="store_true",
                   help="if the run folder holds a run made with other options (image, model, method, method "
                   "configs), remove its outputs and start a new run instead of stopping (exit 5)")
    p.add_argument("--wait", action="store_true",
                   help="if another process is using the run folder, wait for it instead of stopping (exit 5)")
    add_method_arg(p)
    for cls in (ModelConfig, LocalizeConfig, TrainConfig, RuntimeConfig, SampleConfig):
        add_config_args(p, cls)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    out = args.out or Path("outputs") / Path(args.image).stem
    manifest = extract(
        args.image,
        out,
        model=config_from_args(args, ModelConfig),
        localize=config_from_args(args, LocalizeConfig),
        train=config_from_args(args, TrainConfig),
        sample=config_from_args(args, SampleConfig),
        runtime=config_from_args(args, RuntimeConfig),
        resume=args.resume,
        progress=not args.quiet,
        method=args.method,
        wait=args.wait,
        overwrite=args.overwrite,
    )
    tokens = " ".join(manifest.token_list)
    print(f"learned {manifest['num_concepts']} tokens ({tokens}) -> {out}/ "
          f"({manifest['sample_passes']} UNet sample-passes); try: conceptexpress generate {out} \"a photo of <c1>\"")
    return 0
