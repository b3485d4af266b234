"""Imported first by the command line, before any sub-command pulls diffusers' pipelines in: their import warns
(e.g. "`CLIPImageProcessor` requires torchvision") through transformers' logger. ``--debug`` turns the
libraries' logs back on (:func:`conceptexpress.cli.main`)."""

import transformers

transformers.utils.logging.set_verbosity_error()
