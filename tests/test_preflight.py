"""gradsweep.sweep.preflight in-process: every override checked, names first, before Hydra composes or trains anything."""

from __future__ import annotations

import pytest

from gradsweep.config.sections import ConfigError
from gradsweep.sweep.preflight import check_overrides, compose_values, group_options


def error(overrides: list[str], multirun: bool = True) -> str:
    with pytest.raises(ConfigError) as e:
        check_overrides(overrides, multirun)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_good_overrides_pass():
    check_overrides(["model.depth=2,10,30", "init=xavier,kaiming", "optim.lr=0.01", "+tag=a"])
    check_overrides(["model.depth=3"], multirun=False)


@pytest.mark.parametrize("overrides,words", [
    (["model.dept=3"], ["model.dept is not a known key", "model.depth", "model.width"]),
    (["init=xavir"], ["init='xavir' is not valid", "xavier", "kaiming"]),
    (["init=xavier,nope"], ["init='nope' is not valid"]),
    (["model.depth=2,abc"], ["model.depth='abc' is not valid", "an integer"]),
    (["optim.lr=-1"], ["optim.lr=-1.0 is not valid", "> 0"]),
    (["device=tpu"], ["device='tpu' is not valid", "auto, cpu, cuda"]),
    (["model.depth=[1,2"], []),  # a syntax error Hydra's parser reports, on one line
])
def test_bad_override_is_one_line_naming_it(overrides, words):
    message = error(overrides)
    for w in words:
        assert w in message, message


def test_a_sweep_without_multirun_says_to_add_it():
    message = error(["model.depth=2,3"], multirun=False)
    assert "needs -m" in message and "python -m gradsweep -m model.depth=2,3" in message


def test_names_before_values():
    """An unknown key is reported even where an earlier override's value is also bad."""
    assert "model.nope is not a known key" in error(["optim.lr=-1", "model.nope=1"])


def test_values_are_checked_with_the_first_jobs_presets():
    # batch_size must be <= data.n_samples of the composed data preset (regression: 100 points)
    assert "train.batch_size" in error(["train.batch_size=1000"])
    check_overrides(["data=digits", "train.batch_size=1000"])


def test_compose_values_and_group_options():
    values = compose_values(["model.depth=4", "init=kaiming"])
    assert values["model"]["depth"] == 4 and values["init"]["name"] == "kaiming"
    assert "hydra" not in values
    assert {"xavier", "kaiming", "default"} <= set(group_options("init"))


def test_engine_is_not_a_sweep_axis():
    from gradsweep.config.sections import ConfigError
    from gradsweep.sweep.preflight import check_overrides

    with pytest.raises(ConfigError, match="engine=compiled,eager: engine cannot be swept"):
        check_overrides(["engine=compiled,eager", "train.steps=2"])
    check_overrides(["engine=compiled", "model.depth=2,3", "train.steps=2"])
