"""Every config a sub-command builds from its flags equals the dataclass default when no flag is given,
and runtime settings are separate from the method's (fingerprinted) settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from conceptexpress.cli import COMMANDS, build_parser, config_from_args
from conceptexpress.config import (
    BenchConfig,
    EvalConfig,
    GenerateConfig,
    LocalizeConfig,
    ModelConfig,
    RuntimeConfig,
    SampleConfig,
    TrainConfig,
)
from conceptexpress.errors import ConfigError

CASES = [
    (["localize", "img.png"], [ModelConfig, LocalizeConfig]),
    (["extract", "img.png"], [ModelConfig, LocalizeConfig, TrainConfig, RuntimeConfig, SampleConfig]),
    (["generate", "run", "all"], [GenerateConfig]),
    (["extract-dataset", "photos", "--out", "runs"], [ModelConfig, LocalizeConfig, TrainConfig, RuntimeConfig, SampleConfig]),
    (["evaluate", "runs"], [EvalConfig]),
    (["bench-localize", "ds"], [BenchConfig, ModelConfig, LocalizeConfig]),
]


@pytest.mark.parametrize(("argv", "classes"), CASES, ids=[c[0][0] for c in CASES])
def test_no_flags_give_the_defaults(argv, classes):
    args = build_parser().parse_args(argv)
    for cls in classes:
        assert config_from_args(args, cls) == cls(), cls.__name__


def test_every_command_is_registered_once_and_runs_its_module():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert len(sub.choices) == len(COMMANDS)
    for command in COMMANDS:
        names = [n for n, p in sub.choices.items() if p.get_default("func") is command.run]
        assert len(names) == 1, command.__name__


def test_runtime_flags_build_a_runtime_config_not_the_train_config():
    args = build_parser().parse_args(["extract", "img.png", "--micro-batch", "2", "--no-gradient-checkpointing"])
    assert config_from_args(args, TrainConfig) == TrainConfig()
    assert config_from_args(args, RuntimeConfig) == RuntimeConfig(micro_batch=2, gradient_checkpointing=False)  # the default is None: the family's


def test_train_config_hands_runtime_keywords_to_its_runtime():
    cfg = TrainConfig(steps=3, micro_batch=0, checkpoint_every=1)
    assert cfg.runtime == RuntimeConfig(micro_batch=0, checkpoint_every=1)
    assert cfg == TrainConfig(steps=3)  # the method is the same: runtime settings are not compared
    with pytest.raises(ConfigError, match="micro_batch"):
        TrainConfig(micro_batch=-1)


@pytest.mark.parametrize("kw", [{"sample_count": 0}, {"sample_steps": 0}, {"samples": "yes"}])
def test_sample_config_is_checked_when_built(kw):
    with pytest.raises(ConfigError):
        SampleConfig(**kw)


def test_sample_count_zero_fails_on_the_command_line_before_any_work(capsys):
    from conceptexpress.cli import main

    assert main(["extract", "does-not-exist.png", "--sample-count", "0"]) == ConfigError.exit_code
    assert "`--sample-count`" in capsys.readouterr().err


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_too_many_tokens_for_the_vocabulary_is_a_user_error():
    import torch

    from conceptexpress.learn.tokens import init_from_vocabulary

    with pytest.raises(ConfigError, match="split_tokens"):
        init_from_vocabulary(torch.nn.Embedding(10, 4), 11, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("flag,value,name", [("--lr", "inf", "lr"), ("--lr", "nan", "lr"), ("--beta", "nan", "beta"),
                                             ("--seed", str(2**64), "seed"), ("--seed", "-1", "seed")])
def test_non_finite_or_out_of_range_training_options_fail_before_any_work(tmp_path, capsys, flag, value, name):
    from conceptexpress.cli import main

    out = tmp_path / "run"
    photo = Path(__file__).resolve().parents[2] / "examples" / "coffee.jpg"
    code = main(["extract", str(photo), "--out", str(out), "--model", str(tmp_path / "none"), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"`{flag}`" in err[0], err
    assert not out.exists()
