"""``conceptexpress localize IMAGE [--out DIR] …``: find the concepts of one photo (paper §3.2), write their masks."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..config import LocalizeConfig, ModelConfig
from ..errors import NoConceptError
from .args import add_config_args, config_from_args


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("localize", help="find the concepts of one photo (paper §3.2) and write their masks")
    p.add_argument("image", help="the photo (PNG, JPEG, WebP, …)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: outputs/<image name>)")
    p.add_argument("--overwrite", action="store_true",
                   help="the folder holds a trained run: replace it (its tokens, samples, checkpoints are removed)")
    p.add_argument("--wait", action="store_true",
                   help="if another process is using the folder, wait for it instead of stopping (exit 5)")
    add_config_args(p, ModelConfig)
    add_config_args(p, LocalizeConfig)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..io.run_folder import RunFolder
    from ..localization_stage import localize_run

    # Cheap checks first: a bad option, image or output folder fails before the model loads.
    model_cfg = config_from_args(args, ModelConfig)
    loc_cfg = config_from_args(args, LocalizeConfig)
    out = args.out or Path("outputs") / Path(args.image).stem
    manifest, loc = localize_run(args.image, out, model=model_cfg, localize=loc_cfg, overwrite=args.overwrite,
                                 wait=args.wait)
    if loc.num_concepts == 0:
        raise NoConceptError(
            f"no salient concept found in {args.image!r} (every cluster failed the [EOT] filter); "
            f"see {out / RunFolder.STAGES}"
        )
    print(f"found {loc.num_concepts} concepts in {args.image} -> {out}/ ({', '.join(manifest['masks'][:3])}"
          f"{', …' if loc.num_concepts > 3 else ''}, {RunFolder.OVERLAY}, {RunFolder.STAGES}, {RunFolder.LOCALIZATION})")
    return 0
