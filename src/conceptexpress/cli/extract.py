"""``conceptexpress extract IMAGE [--out DIR] [--resume] …``: localize one photo and learn one token per concept."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import (
    FineTuneConfig,
    LocalizeConfig,
    ModelConfig,
    RunConfig,
    RuntimeConfig,
    SampleConfig,
    TrainConfig,
)
from ..learn.methods import METHOD_REGISTRY
from .args import add_config_args, config_from_args


def add_method_arg(p: argparse.ArgumentParser, *, supervised: bool = True) -> None:
    """``--method conceptexpress|bas-dagger|bas|bas-ft`` (``extract-dataset``: without the supervised ones)."""
    methods = [m for m in METHOD_REGISTRY.values() if supervised or not m.per_photo]
    text = "token learning: " + "; ".join(f"{m.name}: {m.help}" for m in methods)
    p.add_argument("--method", choices=[m.name for m in methods], default="conceptexpress", help=text)


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
    p.add_argument("--masks", type=Path, default=None, metavar="DIR",
                   help="folder with one mask image per concept (file-name order; non-zero = inside): skips "
                        "localization's clustering (any method but bas-dagger)")
    for cls in (ModelConfig, LocalizeConfig, TrainConfig, RuntimeConfig, SampleConfig, FineTuneConfig):
        add_config_args(p, cls)
    p.set_defaults(func=run)
    return p


def run_config_from_args(args: argparse.Namespace) -> RunConfig:
    """The :class:`RunConfig` of the flags given (every config validated: a bad option fails here, exit 2)."""
    return RunConfig(
        model=config_from_args(args, ModelConfig),
        localize=config_from_args(args, LocalizeConfig),
        train=config_from_args(args, TrainConfig),
        sample=config_from_args(args, SampleConfig),
        runtime=config_from_args(args, RuntimeConfig),
        finetune=config_from_args(args, FineTuneConfig),
        method=args.method,
        masks=getattr(args, "masks", None),
        resume=getattr(args, "resume", False),
        overwrite=args.overwrite,
        wait=getattr(args, "wait", False),
        progress=not getattr(args, "quiet", False),
    )


def run(args: argparse.Namespace) -> int:
    from ..extract import extract  # the library (torch, diffusers) only once the command runs

    out = args.out or Path("outputs") / Path(args.image).stem
    manifest = extract(args.image, out, run_config_from_args(args))
    tokens = " ".join(manifest.token_list)
    if manifest.get("fine_tune"):
        print(f"fine-tuned pipeline -> {out}/{manifest['fine_tune']['pipeline']}/ (`generate {out}` loads it)")
    print(f"learned {manifest['num_concepts']} tokens ({tokens}) -> {out}/ "
          f"({manifest['sample_passes']} UNet sample-passes); try: conceptexpress generate {out} \"a photo of <c1>\"")
    return 0
