"""The method registry: each name trains what it names, and a method's needs are refused in one place."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from conceptexpress.config import METHODS, TrainConfig
from conceptexpress.errors import ConfigError
from conceptexpress.learn import methods
from conceptexpress.learn.methods import METHOD_REGISTRY, get_method
from conceptexpress.models.family import get_family


def test_each_name_maps_to_the_trainer_it_names():
    from conceptexpress.baselines.bas import BaSTrainer
    from conceptexpress.learn.trainer import TokenTrainer

    assert tuple(METHOD_REGISTRY) == METHODS
    assert get_method("conceptexpress").trainer_class() is TokenTrainer
    for name in ("bas-dagger", "bas", "bas-ft"):
        assert get_method(name).trainer_class() is BaSTrainer
    assert [m.name for m in METHOD_REGISTRY.values() if m.fine_tunes] == ["bas-ft"]
    with pytest.raises(ConfigError, match="`method` must be one of .*got 'dreambooth'"):
        get_method("dreambooth")


def _loc(n: int = 2, *, user_masks: bool = False):
    masks = torch.zeros(n, 4, 4, dtype=torch.bool)
    for i in range(n):
        masks[i, i] = True
    clusters = SimpleNamespace(masks=masks, centroids=torch.rand(n, 16))
    return SimpleNamespace(num_concepts=n, clusters=clusters, work_size=(32, 32), from_user_masks=user_masks,
                           image=Image.new("RGB", (32, 32)))


@pytest.fixture
def trained(monkeypatch):
    """learn_tokens with every trainer replaced by a recorder of which trainer the method named."""
    from conceptexpress.learn import api

    used = []

    def trainer_class(self):
        class Recorder:
            def __init__(self, pipe, image, work_size, masks, centroids, config, *, runtime):
                used.append(method_trainer)
                self.config = config
                self.family, self.dims = get_family("sd2"), (8,)  # what a trainer tells about the token vectors

            def train(self, callbacks=()):
                return SimpleNamespace(embeddings=torch.zeros(masks_n, 8), history=[], sample_passes=0)

        method_trainer, masks_n = self.trainer, 2
        return Recorder

    monkeypatch.setattr(methods.Method, "trainer_class", trainer_class)
    return api.learn_tokens, used


@pytest.mark.parametrize("name", ["conceptexpress", "bas-dagger", "bas"])
def test_learn_tokens_trains_what_the_method_names(trained, name):
    learn_tokens, used = trained
    config = TrainConfig(init_words="cup,saucer") if name == "bas" else TrainConfig()
    tokens = learn_tokens(_loc(), None, config, method=name)
    assert used == [METHOD_REGISTRY[name].trainer] and tokens.method == name
    # the old defect: "bas" trained ConceptExpress's TokenTrainer
    assert ("BaSTrainer" in used[0]) == (name != "conceptexpress")


def test_learn_tokens_refuses_what_a_method_cannot_do(trained):
    learn_tokens, used = trained
    with pytest.raises(ConfigError, match="'bas' is Break-A-Scene with your supervision"):
        learn_tokens(_loc(), None, TrainConfig(), method="bas")
    with pytest.raises(ConfigError, match="'bas-dagger' is the unsupervised"):
        learn_tokens(_loc(), None, TrainConfig(init_words="cup,saucer"), method="bas-dagger")
    with pytest.raises(ConfigError, match="'bas-ft' fine-tunes the UNet"):
        learn_tokens(_loc(), None, TrainConfig(), method="bas-ft")
    with pytest.raises(ConfigError, match="names 3 words .* holds 2 masks"):
        learn_tokens(_loc(user_masks=True), None, TrainConfig(init_words="a,b,c"), method="bas")
    assert used == []
    learn_tokens(_loc(user_masks=True), None, TrainConfig(), method="bas")  # the user's masks are supervision
    assert len(used) == 1


def test_dataset_refuses_per_photo_methods():
    for name in ("bas", "bas-ft"):
        with pytest.raises(ConfigError, match="a dataset run has no per-photo masks"):
            get_method(name).check_dataset(TrainConfig())
    get_method("bas-dagger").check_dataset(TrainConfig())
