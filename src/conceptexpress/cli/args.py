"""Argument helpers shared by the sub-commands: flags generated from the config dataclasses.

Names, types, choices, defaults and help come from the fields of the frozen configs
(:mod:`conceptexpress.config`), so the command line cannot drift from the Python API.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, fields
from typing import Any

from ..config import ModelConfig, field_help


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``error: …``) instead of usage + message."""

    def error(self, message: str):  # type: ignore[override]
        print(f"error: {self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


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


def given_options(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` the user set on the command line (unset flags are absent)."""
    prefix = cls.__name__ + "."
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix) and v is not None}


def config_from_args(args: argparse.Namespace, cls: type, **extra: Any):
    """Build ``cls`` from the flags the user gave; unset flags keep the dataclass defaults."""
    return cls(**{**extra, **given_options(args, cls)})
