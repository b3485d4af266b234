"""The toy world's command line.

    python -m conceptexpress.toy train OUT [--steps N] [--seed S]    # train the toy Stable Diffusion
    python -m conceptexpress.toy path                                 # folder of the shipped toy model
    python -m conceptexpress.toy scene SEED OUT.png [--objects K]     # render a scene (prints its caption)
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .train import ToyTrainConfig, check_device, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conceptexpress.toy")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the toy text-to-image model from scratch into OUT")
    p.add_argument("out")
    for f in fields(ToyTrainConfig):
        if isinstance(f.default, bool):  # --latent-attention / --no-latent-attention
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    sub.add_parser("path", help="print the folder of the shipped toy model")
    sc = sub.add_parser("scene", help="render toy scene SEED to a PNG and print its caption")
    sc.add_argument("seed", type=int)
    sc.add_argument("png")
    sc.add_argument("--objects", type=int, default=None, help="1-4 (default: drawn from the seed)")
    args = parser.parse_args(argv)
    if args.command == "path":
        from ..errors import ConceptExpressError
        from .shipped import toy_pipeline_path

        try:
            print(toy_pipeline_path())
        except ConceptExpressError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.command == "scene":
        from .world import render_scene

        try:
            scene = render_scene(args.seed, args.objects)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        scene.image.save(args.png)
        print(scene.caption)
        return 0
    try:
        cfg = ToyTrainConfig(**{f.name: getattr(args, f.name) for f in fields(ToyTrainConfig)})
        check_device(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    path = train(args.out, cfg, log=lambda m: print(m, flush=True))
    print(f"pipeline: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
