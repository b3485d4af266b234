"""The libraries' logging, set once a command is parsed and before it imports them (``--help`` never does).

diffusers' pipelines warn while they are imported (e.g. "`CLIPImageProcessor` requires torchvision", through
transformers' logger), and both libraries draw progress bars of their own. Quieting them is therefore the first
thing :func:`conceptexpress.cli.main` does once a command will run: it imports transformers and diffusers (the
command imports them anyway) and sets their loggers before the command's ``run`` imports the library.
``--debug`` turns their warnings back on.
"""

from __future__ import annotations

import warnings


def quiet_libraries(debug: bool = False) -> None:
    """Libraries' warnings on with ``debug``; otherwise errors only, no FutureWarning and no progress bars."""
    import transformers

    transformers.utils.logging.set_verbosity_error()  # first: importing diffusers logs through this logger

    import diffusers

    if debug:
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="diffusers")
    try:
        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.disable_progress_bar()
    except Exception:  # pragma: no cover - logging tweaks are best effort
        pass
