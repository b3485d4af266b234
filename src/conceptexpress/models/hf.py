"""Loading transformers models (evaluation encoders, SAM, DINO for MaskCut): quiet, PIL image processors, one-line ModelLoadError."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..errors import ModelLoadError

T = TypeVar("T")


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars while loading, then restore the user's settings.

    Loading ``CLIPVisionModelWithProjection`` from a full CLIP checkpoint reports every text-tower weight as
    "unexpected"; that is intended here (only the vision tower and its projection are used).
    """
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def pil_processor_class(class_name: str) -> type:
    """``transformers.<class_name>Pil`` on transformers 5 (torchvision not needed), else ``<class_name>``."""
    import transformers

    return getattr(transformers, class_name + "Pil", None) or getattr(transformers, class_name)


def pil_image_processor(class_name: str, source: str) -> Any:
    """``<class_name>Pil.from_pretrained(source)`` on transformers 5 (torchvision not needed), else ``<class_name>``.

    transformers 5 defaults to torchvision-backed processors and only falls back to the PIL ones with a warning when
    torchvision is missing; asking for the PIL backend explicitly gives the same numbers on every install. On
    transformers 4 the plain class is the PIL/NumPy one.
    """
    return pil_processor_class(class_name).from_pretrained(source)


def looks_like_path(source: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (``./x``, ``/abs``, ``a/b/c``, ``~``) is a path."""
    return source.startswith((".", "/", "~", "\\")) or source.count("/") > 1 or Path(source).exists()


def first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def check_source(what: str, source: str, alternatives: str) -> None:
    """Fail now (one ``ModelLoadError`` line) when ``source`` is empty or a local path that does not exist.

    Hub ids are not checked here: that needs the network, which loading itself tries.
    """
    if not isinstance(source, str) or not source.strip():
        raise ModelLoadError(f"{what}: empty model id; {alternatives}")
    if looks_like_path(source) and not Path(source).expanduser().exists():
        raise ModelLoadError(f"{what} {source!r}: no such folder; {alternatives}")


def load_or_fail(what: str, source: str, alternatives: str, load: Callable[[str], T]) -> T:
    """``load(source)`` with transformers quiet; any failure becomes one ``ModelLoadError`` line.

    ``what`` names the model ("CLIP image encoder"), ``alternatives`` says what else the user can pass.
    """
    check_source(what, source, alternatives)
    src = str(Path(source).expanduser()) if looks_like_path(source) else source
    try:
        with quiet_transformers():
            return load(src)
    except ModelLoadError:
        raise
    except Exception as exc:  # hub, network, config and weight errors all end here
        raise ModelLoadError(f"could not load {what} {source!r}: {first_line(exc)}; {alternatives}") from exc
