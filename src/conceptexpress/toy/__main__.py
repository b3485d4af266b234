"""``python -m conceptexpress.toy train OUT [--steps N] [--seed S]``: train the toy Stable Diffusion."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from .train import ToyTrainConfig, train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m conceptexpress.toy")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train the toy text-to-image model from scratch into OUT")
    p.add_argument("out")
    for f in fields(ToyTrainConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    cfg = ToyTrainConfig(**{f.name: getattr(args, f.name) for f in fields(ToyTrainConfig)})
    path = train(args.out, cfg, log=lambda m: print(m, flush=True))
    print(f"pipeline: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
