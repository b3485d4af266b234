"""Exceptions for problems a user can fix.

Every message names the input and the value at fault in one line; the CLI prints it as ``error: <message>``
and exits with the class's ``exit_code`` instead of showing a stack trace. ``assert`` is kept for internal
invariants only.
"""

from __future__ import annotations


class ConceptExpressError(Exception):
    """Base class of all user-facing errors."""

    exit_code = 1


class InputError(ConceptExpressError):
    """The input image cannot be used (missing, not an image, truncated, too small, too large)."""

    exit_code = 3


class ModelLoadError(ConceptExpressError):
    """The base model cannot be found or loaded."""

    exit_code = 4


class OutputError(ConceptExpressError):
    """The output folder cannot be created or written."""

    exit_code = 5


class ConfigError(ConceptExpressError):
    """An option has a value outside its allowed range."""

    exit_code = 2


class NoConceptError(ConceptExpressError):
    """Localization found no salient concept in the image."""

    exit_code = 6
