"""The token-learning methods by name: ConceptExpress and the Break-A-Scene baselines of paper §4.1 / Table 1.

One entry per name, one signature (as segment-anything's ``sam_model_registry`` maps a name to a builder)::

    method = get_method("bas")                 # ConfigError naming the value if it is no method
    method.check(train, user_masks=masks)      # the method's needs against what it was given, one line if unmet
    trainer = method.trainer_class()(pipe, image, work_size, masks, centroids, train, runtime=runtime)

:func:`~conceptexpress.learn.api.learn_tokens`, :func:`~conceptexpress.extract.extract`,
:func:`~conceptexpress.dataset.run.extract_dataset`, the web UI and the command line's ``--method`` choices all
dispatch through :data:`METHOD_REGISTRY`; the refusals of a method given what it cannot use (or not given what it
needs) live in :meth:`Method.check` only.

The trainer classes are imported on use: the command line lists the methods without importing torch.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from ..config import METHODS, TrainConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from .trainer import TokenTrainer

__all__ = ["METHOD_REGISTRY", "Method", "get_method"]


@dataclass(frozen=True)
class Method:
    """One token-learning method.

    ``trainer`` is the token phase's trainer as ``"module:Class"`` (every trainer takes the arguments of
    :class:`~conceptexpress.learn.trainer.TokenTrainer`); ``supervision`` says what the method does with the user's
    masks and initializer words: ``"refused"`` (BaS† is the unsupervised baseline), ``"optional"`` (used when
    given) or ``"required"`` (at least one of the two). ``per_photo``: only ``extract`` runs it, not
    ``extract-dataset`` (the supervision is per photo). ``fine_tunes``: a second phase trains the UNet and the text
    encoder and writes a pipeline (Break-A-Scene's phase 2), so it needs a run folder. ``forced_train``: the
    :class:`~conceptexpress.config.TrainConfig` fields the trainer forces whatever was asked (recorded configs
    are compared with these applied).
    """

    name: str
    help: str
    trainer: str
    supervision: Literal["refused", "optional", "required"]
    per_photo: bool = False
    fine_tunes: bool = False
    merge_schedule: bool = False  # the split-and-merge schedule of TrainConfig is used (paper §3.3)
    forced_train: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def trainer_class(self) -> type[TokenTrainer]:
        """The token phase's trainer class (imported here: the registry itself imports no torch)."""
        module, _, name = self.trainer.partition(":")
        return getattr(importlib.import_module(module), name)

    def check(self, train: TrainConfig, *, masks: int | None = None, source: str = "`masks`") -> None:
        """Refuse, with one line, a method given what it cannot use or not given what it needs.

        Args:
            train: the training options (``train.init_words``: the user's initializer words).
            masks: how many user masks the concepts are (``None``: the concepts are localization's).
            source: how to name the masks in the message (a folder, ``--masks DIR``).

        Raises:
            ConfigError: naming the method and what is missing or extra.
        """
        words = train.init_word_list
        if self.merge_schedule:
            train.check_merge_schedule()
        if self.supervision == "required" and masks is None and not words:
            raise ConfigError(
                f"`method` {self.name!r} is Break-A-Scene with your supervision: give `masks` (--masks DIR, one mask "
                "image per concept) and/or `init_words`; without either it is the BaS† baseline (--method bas-dagger)"
            )
        if self.supervision == "refused" and (masks is not None or words):
            raise ConfigError(
                f"`method` {self.name!r} is the unsupervised BaS† baseline (random initialization, localized masks); "
                "with `masks` or `init_words` use --method bas"
            )
        if masks is not None and words and len(words) != masks:
            raise ConfigError(
                f"`init_words` names {len(words)} words ({','.join(words)}) but {source} holds {masks} masks; give "
                "one word per mask, in that order"
            )

    def check_dataset(self, train: TrainConfig) -> None:
        """Refuse a method or options that need per-photo supervision for a whole dataset (``extract-dataset``)."""
        if self.per_photo or train.init_words:
            raise ConfigError(
                "a dataset run has no per-photo masks or initializer words: run `extract IMAGE --masks DIR "
                f"--init-words …` for each photo (got method {self.name!r}, init_words {train.init_words!r})"
            )
        self.check(train)


_BAS = "conceptexpress.baselines.bas:BaSTrainer"
_BAS_FORCES = MappingProxyType({"split_merge": False, "contrastive": False})  # baselines/bas.py

METHOD_REGISTRY: Mapping[str, Method] = MappingProxyType({
    m.name: m
    for m in (
        Method("conceptexpress", "ConceptExpress (paper §3.3–3.4): split-and-merge tokens, masked denoising, "
               "contrastive and EMD losses", "conceptexpress.learn.trainer:TokenTrainer", "optional",
               merge_schedule=True),
        Method("bas-dagger", "the BaS† baseline of paper §4.1: Break-A-Scene's token phase on the localized masks",
               _BAS, "refused", forced_train=_BAS_FORCES),
        Method("bas", "Break-A-Scene's token phase with your --masks and/or --init-words (paper Table 1 grey rows, "
               "Fig. 8)", _BAS, "required", per_photo=True, forced_train=_BAS_FORCES),
        Method("bas-ft", "then Break-A-Scene's UNet + text encoder phase, saved as RUN/pipeline/", _BAS, "optional",
               per_photo=True, fine_tunes=True, forced_train=_BAS_FORCES),
    )
})
assert tuple(METHOD_REGISTRY) == METHODS  # config.METHODS is the names' one list (config fields validate against it)


def get_method(name: str) -> Method:
    """The registry's entry ``name``; ConfigError naming the value otherwise."""
    try:
        return METHOD_REGISTRY[name]
    except (KeyError, TypeError):
        raise ConfigError(f"`method` must be one of {', '.join(METHOD_REGISTRY)}, got {name!r}") from None
