"""``conceptexpress edit RUN --merge 1,2 --drop 4 --split 3 --add-mask m.png``: fix a run's concepts before training.

Concept numbers are the ones on the run's overlay (1-based) *before* this edit, whatever the order of the flags;
the edits apply as drop → merge → split → add. Merge and drop need no model; split and add recompute the image's
self-attention with the run's recorded model and localization options (``--model``/``--device``/``--dtype``
override them). The run's localization is rewritten atomically, the old one kept under ``RUN/backups/``
(:meth:`conceptexpress.io.run_folder.RunFolder.rewrite_localization`); ``conceptexpress extract IMAGE --out RUN`` then trains on the edited concepts.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import LocalizeConfig, ModelConfig
from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch

HELP = "merge, drop, split or add concepts of a localized run before training (numbers as on its overlay)"


def _numbers(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected concept numbers like 1,2, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"concept numbers start at 1, got {text!r}")
    return values


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("edit", help=HELP, description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="a run folder written by `localize` or `extract`")
    p.add_argument("--merge", type=_numbers, action="append", default=[], metavar="I,J[,…]",
                   help="merge these concepts into one (repeatable)")
    p.add_argument("--drop", type=_numbers, action="append", default=[], metavar="I[,…]", help="drop these concepts")
    p.add_argument("--split", type=_numbers, action="append", default=[], metavar="I[,…]",
                   help="re-cluster each of these concepts one level finer (loads the model)")
    p.add_argument("--add-mask", type=Path, action="append", default=[], metavar="MASK.png",
                   help="add a concept from a mask image at the photo's size, non-zero = inside (loads the model)")
    p.add_argument("--image", type=Path, default=None,
                   help="the run's photo, if it moved since localization (checked by SHA-256)")
    add_model_flags(p, "for split/add; default: what the run recorded")
    p.set_defaults(func=run)
    return p


def add_model_flags(parser: argparse.ArgumentParser, default_text: str) -> None:
    """One ``--flag`` per ModelConfig field (help and choices from its metadata), unset = None."""


    group = parser.add_argument_group(f"ModelConfig ({default_text})")
    for f in fields(ModelConfig):
        group.add_argument("--" + f.name.replace("_", "-"), dest=f"model_{f.name}", default=None,
                           metavar=f.name.upper(), choices=f.metadata.get("choices"),
                           help=f"{f.metadata.get('help', '')} (default: {f.default})")


def model_config(args: argparse.Namespace, base: dict | None = None):
    """ModelConfig from ``base`` (e.g. a run's recorded one) overridden by the flags the user gave."""


    given = {f.name: getattr(args, f"model_{f.name}") for f in fields(ModelConfig)}
    return ModelConfig(**{**(base or {}), **{k: v for k, v in given.items() if v is not None}})


def run(args: argparse.Namespace) -> int:
    from ..io.images import load_image
    from ..io.masks import read_mask
    from ..io.run_folder import RunFolder, file_sha256
    from ..localization_stage import load_localization, rewrite_localization
    from ..localize.edit import apply_edits

    if not (args.merge or args.drop or args.split or args.add_mask):
        raise ConfigError("nothing to edit: give --merge, --drop, --split or --add-mask")
    masks = [read_mask(p) for p in args.add_mask]  # cheap checks before the lock and the model
    with RunFolder(args.run).lock(wait=False):
        loc, manifest = load_localization(args.run)
        image_path = args.image or Path(manifest["image"])
        image = load_image(image_path)
        if manifest.get("image_sha256") and file_sha256(image_path) != manifest["image_sha256"]:
            raise InputError(f"image '{image_path}' is not the photo this run was localized on (SHA-256 differs)")
        attn = None
        if args.split or masks:
            config = manifest.get("config", {})
            model_cfg = model_config(args, config.get("ModelConfig", {}))
            attn = _attention(image, model_cfg, LocalizeConfig(**config.get("LocalizeConfig", {})), loc)
        before = loc.num_concepts
        edited, done = apply_edits(loc, merge=args.merge, drop=args.drop, split=args.split, masks=masks, attn=attn)
        backup = rewrite_localization(args.run, edited, image, manifest, done)
    print(f"edited {args.run}: {before} -> {edited.num_concepts} concepts ({'; '.join(done)}); "
          f"previous localization kept in {backup}; train with: conceptexpress extract {image_path} --out {args.run}")
    return 0


def _attention(image, model_cfg, loc_cfg, loc) -> torch.Tensor:
    """The image's aggregated self-attention (h·w, h·w), recomputed as localization computed it (deterministic)."""
    from ..attention.localizer import ConceptLocalizer
    from ..models import load_pipeline

    maps = ConceptLocalizer(load_pipeline(model_cfg), loc_cfg).attention(image)
    if tuple(maps.latent_hw) != tuple(loc.latent_hw):
        raise ConfigError(
            f"model {model_cfg.model!r} gives a {maps.latent_hw} latent but the run was localized at {loc.latent_hw}; "
            "use the run's model"
        )
    return maps.attn
