"""The command line: ``conceptexpress COMMAND …`` (one module per sub-command, as diffusers' ``commands/``).

Each sub-command is a module of this package with ``add_parser(subparsers) -> ArgumentParser`` and
``run(args) -> int`` (the exit code), listed once in :data:`COMMANDS`; adding a command is one line there.
Flags are generated from the frozen config dataclasses (:mod:`.args`), so the CLI cannot drift from the Python
API. User errors print one line ``error: …`` and exit with the error's code (``conceptexpress.errors``: one code
per kind, 1 only for a bug); ``--debug`` shows the traceback instead.

Nothing outside this package imports it or argparse: the library never depends on the shell.

``--help`` answers at once (as diffusers' ``commands/``): this package and the command modules import only the
configs and argparse at the top; each ``run`` imports the library (torch, diffusers, …) when the command runs,
after :func:`._quiet.quiet_libraries` has set the libraries' logging.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

from .. import __version__
from ..errors import ConceptExpressError
from . import (
    bench_localize,
    edit,
    evaluate,
    extract,
    extract_dataset,
    generate,
    localize,
    ui,
)
from ._quiet import quiet_libraries
from .args import Parser, add_config_args, add_run_model_args, config_from_args

__all__ = ["COMMANDS", "add_config_args", "add_run_model_args", "build_parser", "config_from_args", "main"]

# The sub-commands, in --help order.
COMMANDS = [localize, extract, generate, extract_dataset, evaluate, bench_localize, edit, ui]

logger = logging.getLogger("conceptexpress")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="conceptexpress",
        description="Extract every object of a photo into its own Stable Diffusion token (ConceptExpress).",
    )
    parser.add_argument("--version", action="version", version=f"conceptexpress {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        known = set(sub.choices)
        command.add_parser(sub)
        for name in set(sub.choices) - known:  # the parser(s) the module added run its `run`
            sub.choices[name].set_defaults(func=command.run, flags=_option_strings(sub.choices[name]))
    return parser


def _option_strings(parser: argparse.ArgumentParser) -> frozenset[str]:
    return frozenset(s for action in parser._actions for s in action.option_strings)


def name_flags(message: str, flags: frozenset[str]) -> str:
    """A library message as the command line's user reads it: each `field` that is a flag of the command
    becomes `--field` (``"`merge_step` must be …"`` → ``"`--merge-step` must be …"``)."""

    def flag(match: re.Match) -> str:
        option = "--" + match.group(1).replace("_", "-")
        return f"`{option}`" if option in flags else match.group(0)

    return re.sub(r"`([a-z][a-z0-9_]*)`", flag, message)


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
    quiet_libraries(debug=args.debug)  # before `run` imports diffusers' pipelines
    try:
        return args.func(args)
    except ConceptExpressError as exc:
        if args.debug:
            raise
        print(f"error: {name_flags(str(exc), getattr(args, 'flags', frozenset()))}", file=sys.stderr)
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
