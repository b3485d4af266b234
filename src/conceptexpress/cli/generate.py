"""``conceptexpress generate RUN_DIR PROMPT [PROMPT ...]``: sample images with a run's learned tokens.

Sampling flags come from :class:`~conceptexpress.config.GenerateConfig` (``-n`` is short for ``--n``), model flags
from :class:`~conceptexpress.config.ModelConfig` with the run's base model as default.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, fields
from pathlib import Path

from ..config import GenerateConfig, ModelConfig
from .args import add_config_args, add_run_model_args, config_from_args, given_options


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate",
        help="generate images with a run's learned tokens",
        description='Sample images of prompts that use a run\'s tokens, e.g. "a photo of <c1> on a beach". '
        'Shorthands: "all" = every concept together, "<c2>" = "a photo of <c2>".',
    )
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a finished run folder (with manifest.json)")
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help='prompt, "all", or a bare token such as "<c2>"')
    p.add_argument("--out", type=Path, default=None, help="output folder (default: RUN_DIR/generated)")
    n_field = next(f for f in fields(GenerateConfig) if f.name == "n")
    p.add_argument(
        "-n", "--n", dest="GenerateConfig.n", type=int, default=None, metavar="N",
        help=f"{n_field.metadata['help']} (default: {n_field.default})",
    )
    add_config_args(p, GenerateConfig, skip=("n",))
    add_run_model_args(p, "the run's, from manifest.json")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from ..generate import expand_prompt, generate_from_run, prompt_folders, run_model_config
    from ..io.run_folder import read_manifest

    # Flags first, then the run: both fail in a second, before the model loads.
    gen_cfg = config_from_args(args, GenerateConfig)
    manifest = read_manifest(args.run_dir)
    model_cfg = run_model_config(manifest, given_options(args, ModelConfig), args.run_dir)
    root = generate_from_run(args.run_dir, args.prompts, gen_cfg, out_dir=args.out, model_options=asdict(model_cfg))
    expanded = list(dict.fromkeys(expand_prompt(p, manifest.token_list) for p in args.prompts))
    for prompt, folder in zip(expanded, prompt_folders(root, expanded)):
        print(f"{prompt!r}: {gen_cfg.n} images + grid.png -> {folder}/")
    return 0
