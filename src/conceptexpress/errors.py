"""Exceptions for problems a user can fix.

Every message names the input and the value at fault in one line; the CLI prints it as ``error: <message>``
and exits with the class's ``exit_code`` instead of showing a stack trace. ``assert`` is kept for internal
invariants only.

Exit codes, one per kind: 0 success, 1 a bug (any other exception: "internal error"), 2 a bad option
(:class:`ConfigError`, also argparse's usage errors), 3 unusable input (also a damaged file of a run folder,
:class:`RunFolderError`), 4 model not loadable, 5 output not writable (also a run folder locked by another
process, or holding a run made with other options), 6 no concept found, 7 any other user-facing error,
130 interrupted.
"""

from __future__ import annotations


class ConceptExpressError(Exception):
    """Base class of all user-facing errors (exit code 7 unless a subclass says otherwise; 1 is kept for bugs)."""

    exit_code = 7


class InputError(ConceptExpressError):
    """The input image cannot be used (missing, not an image, truncated, too small, too large)."""

    exit_code = 3


class RunFolderError(InputError):
    """A file of a run folder is missing, damaged (truncated, garbled, SHA-256 differs from the one recorded), of
    the wrong schema, shape or dtype, or a JSON entry points outside the folder. The message names the file."""


class ModelLoadError(ConceptExpressError):
    """The base model cannot be found or loaded."""

    exit_code = 4


class OutputError(ConceptExpressError):
    """The output folder cannot be created or written."""

    exit_code = 5


class ConfigError(ConceptExpressError, ValueError):
    """An option has a value outside its allowed range (also a ``ValueError``, as Python callers expect)."""

    exit_code = 2


class NoConceptError(ConceptExpressError):
    """Localization found no salient concept in the image."""

    exit_code = 6
