"""Command line: ``conceptexpress localize IMAGE [--model M] [--out DIR] [--n-max 10] …``.

Flags are generated from the frozen config dataclasses (``conceptexpress.config``): names, types, choices,
defaults and help come from the fields, so the CLI cannot drift from the Python API. User errors print one
line ``error: …`` and exit with the error's code (see ``conceptexpress.errors``); ``--debug`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from .config import LocalizeConfig, ModelConfig, TrainConfig, field_help
from .errors import ConceptExpressError, NoConceptError

logger = logging.getLogger("conceptexpress")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: …``) instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


# ----------------------------------------------------------------------------- flags from dataclasses
def _flag_type(annotation: Any) -> tuple[type, bool]:
    """(scalar type, optional?) of a field annotation such as ``int``, ``str | None``."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def add_config_args(parser: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = ()) -> None:
    """Add one ``--kebab-name`` flag per field of dataclass ``cls`` (dest ``Cls.field``, default unset)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        if f.name in skip:
            continue
        typ, _ = _flag_type(hints[f.name])
        default = f.default if f.default is not MISSING else None
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        kwargs: dict[str, Any] = {"dest": f"{cls.__name__}.{f.name}", "default": None, "help": help_text}
        if typ is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = typ
            kwargs["metavar"] = f.name.upper()
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def add_run_model_args(parser: argparse.ArgumentParser, default_text: str) -> None:
    """ModelConfig flags for commands that read finished runs: ``--model`` and ``--single-file-config`` default
    to what each run's manifest recorded (``default_text`` says so in --help), not to ModelConfig's defaults."""
    add_config_args(parser, ModelConfig, skip=("model", "single_file_config"))
    helps = field_help(ModelConfig)
    group = parser.add_argument_group("ModelConfig (base model)")
    for name in ("model", "single_file_config"):
        group.add_argument(
            "--" + name.replace("_", "-"), dest=f"ModelConfig.{name}", default=None, metavar=name.upper(),
            help=f"{helps[name]} (default: {default_text})",
        )


def config_from_args(args: argparse.Namespace, cls: type, **extra: Any):
    """Build ``cls`` from the flags the user gave; unset flags keep the dataclass defaults."""
    prefix = cls.__name__ + "."
    given = {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}
    return cls(**{**extra, **given})


# ----------------------------------------------------------------------------- commands
def _cmd_localize(args: argparse.Namespace) -> int:
    from .extract import localize_to_folder
    from .io.atomic import ensure_output_dir
    from .io.images import load_image
    from .models import load_pipeline

    # Cheap checks first: a bad option, image or output folder fails before the model loads.
    model_cfg = config_from_args(args, ModelConfig)
    loc_cfg = config_from_args(args, LocalizeConfig)
    image = load_image(args.image)
    out = ensure_output_dir(args.out or Path("outputs") / Path(args.image).stem)

    pipe = load_pipeline(model_cfg)
    manifest, loc = localize_to_folder(pipe, image, args.image, out, model_cfg, loc_cfg)
    if loc.num_concepts == 0:
        raise NoConceptError(
            f"no salient concept found in {args.image!r} (every cluster failed the [EOT] filter); "
            f"see {out / 'stages.png'}"
        )
    print(f"found {loc.num_concepts} concepts in {args.image} -> {out}/ ({', '.join(manifest['masks'][:3])}"
          f"{', …' if loc.num_concepts > 3 else ''}, overlay.png, stages.png, localization.json)")
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from .extract import SampleConfig, extract

    manifest = extract(
        args.image,
        args.out or Path("outputs") / Path(args.image).stem,
        model=config_from_args(args, ModelConfig),
        localize=config_from_args(args, LocalizeConfig),
        train=config_from_args(args, TrainConfig),
        sample=config_from_args(args, SampleConfig),
        resume=args.resume,
        progress=not args.quiet,
        method=args.method,
    )
    tokens = " ".join(t["token"] for t in manifest["tokens"])
    out = args.out or Path("outputs") / Path(args.image).stem
    print(f"learned {manifest['num_concepts']} tokens ({tokens}) -> {out}/ "
          f"({manifest['sample_passes']} UNet sample-passes); try: conceptexpress generate {out} \"a photo of <c1>\"")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(
        prog="conceptexpress",
        description="Extract every object of a photo into its own Stable Diffusion token (ConceptExpress).",
    )
    parser.add_argument("--version", action="version", version=f"conceptexpress {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("localize", help="find the concepts of one photo (paper §3.2) and write their masks")
    p.add_argument("image", help="the photo (PNG, JPEG, WebP, …)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: outputs/<image name>)")
    add_config_args(p, ModelConfig)
    add_config_args(p, LocalizeConfig)
    p.set_defaults(func=_cmd_localize)

    from .extract import SampleConfig

    p = sub.add_parser("extract", help="localize the concepts of one photo and learn one token each (paper §3)")
    p.add_argument("image", help="the photo (PNG, JPEG, WebP, …)")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: outputs/<image name>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.add_argument(
        "--method",
        choices=("conceptexpress", "bas-dagger"),
        default="conceptexpress",
        help="token learning: ConceptExpress (default) or the BaS† baseline of paper §4.1 on the same masks",
    )
    add_config_args(p, ModelConfig)
    add_config_args(p, LocalizeConfig)
    add_config_args(p, TrainConfig)
    add_config_args(p, SampleConfig)
    p.set_defaults(func=_cmd_extract)

    from .generate import add_generate_parser

    add_generate_parser(sub)

    from .dataset import add_extract_dataset_parser

    add_extract_dataset_parser(sub)

    from .evaluate.cli import add_evaluate_parser

    add_evaluate_parser(sub)

    from .locbench.cli import add_bench_localize_parser

    add_bench_localize_parser(sub)

    from . import edit_cli
    from .ui import cli as ui_cli

    edit_cli.add_parser(sub)
    ui_cli.add_parser(sub)
    return parser


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    try:
        import diffusers
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging tweaks are best effort
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return int(exc.code or 0)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s: %(message)s" if args.debug else "%(message)s",
        stream=sys.stderr,
    )
    if not args.debug:
        _quiet_libraries()
    try:
        return args.func(args)
    except ConceptExpressError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; finished files are kept, the run's manifest is only written at the end",
              file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not a user error: say so in one line, trace with --debug
        if args.debug:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"error: internal error ({type(exc).__name__}: {first}); rerun with --debug for the traceback",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
