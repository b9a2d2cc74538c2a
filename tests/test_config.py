"""The YAML presets against the schemas, and the one conversion from Hydra's config."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from gradsweep.config.identity import as_dict, config_hash, flatten
from gradsweep.config.sections import (
    ConfigError,
    InitCfg,
    RunCfg,
    build_run_cfg,
)
from gradsweep.sweep.compose import to_run_cfg
from gradsweep.sweep.preflight import group_options
from gradsweep.tune.config import SearchDim, TuneCfg


def test_defaults_compose_to_the_schema_defaults(composed):
    cfg = to_run_cfg(composed())
    assert cfg == dataclasses.replace(RunCfg(), extra={})


@pytest.mark.parametrize("group", ["init", "data", "optim", "model", "train", "verdict", "stats"])
def test_every_preset_is_valid(composed, group, tmp_path):
    np.savez(tmp_path / "d.npz", x=np.eye(4), y=np.arange(4.0))
    for option in group_options(group):
        if (group, option) == ("data", "arrays"):  # the user's file: nothing to train on without data.path
            with pytest.raises(ConfigError, match="data.path is required with data=arrays"):
                to_run_cfg(composed(["data=arrays"]))
            to_run_cfg(composed(["data=arrays", f"data.path={tmp_path / 'd.npz'}"]))
            continue
        if (group, option) == ("model", "custom"):  # the user's module: model.net._target_ names it
            with pytest.raises(ConfigError, match="model.net._target_ is required with model=custom"):
                to_run_cfg(composed(["model=custom"]))
            cfg = to_run_cfg(composed(["model=custom", "model.net._target_=torch.nn.Linear", "model.net.bias=false"]))
            assert cfg.model.net == {"_target_": "torch.nn.Linear", "bias": False}
            continue
        if (group, option) == ("model", "cnn"):  # a conv net needs images: refused on the default regression data
            with pytest.raises(ConfigError, match="model=cnn is not valid with data=regression"):
                to_run_cfg(composed(["model=cnn"]))
            to_run_cfg(composed(["model=cnn", "data=digits"]))
            continue
        to_run_cfg(composed([f"{group}={option}"]))


def test_article_init_presets(composed):
    kaiming = to_run_cfg(composed(["init=kaiming"])).init
    # kaiming_uniform_'s own defaults, as the article calls it.
    assert (kaiming.scheme, kaiming.distribution, kaiming.a, kaiming.mode, kaiming.nonlinearity) == (
        "kaiming", "uniform", 0.0, "fan_in", "leaky_relu")
    xavier = to_run_cfg(composed(["init=xavier"])).init
    assert (xavier.scheme, xavier.distribution, xavier.gain, xavier.bias) == ("xavier", "uniform", 1.0, None)
    large = to_run_cfg(composed(["init=large"])).init
    assert (large.name, large.scheme, large.std, large.mean) == ("large", "normal", 10.0, 0.0)


def test_flatten_names_columns_like_override_keys(composed):
    flat = flatten(to_run_cfg(composed(["init=xavier", "optim.lr=0.1", "+tag=x"])))
    assert flat["init"] == "xavier" and flat["optim.lr"] == 0.1 and flat["tag"] == "x"
    assert flat["model.depth"] == 10 and flat["train.clip_norm"] is None and flat["data"] == "regression"
    assert "quiet" not in flat and "init.name" not in flat


def test_as_dict_is_dataclasses_asdict():
    import dataclasses

    tagged = {"init": {"name": "xavier", "scheme": "xavier", "bias": 0.0}, "train": {"clip_norm": 1.0}, "tag": "x",
              "note": 3}
    nested = RunCfg(extra={"tag": [1, {"a": (2, 3)}]})
    cfgs = [build_run_cfg({}), build_run_cfg(tagged), nested, TuneCfg(search=[SearchDim("optim.lr", 1e-3, 1.0, True)])]
    for cfg in cfgs:
        d = as_dict(cfg)
        assert d == dataclasses.asdict(cfg) and repr(d) == repr(dataclasses.asdict(cfg))  # types too (tuples stay)
    as_dict(nested)["extra"]["tag"][1]["a"] = None  # a copy, as asdict's: the config is untouched
    assert nested.extra["tag"][1]["a"] == (2, 3)
    # run_ids as dataclasses.asdict gave them (a sweep resumed across this change keeps its runs)
    assert (config_hash(build_run_cfg({})), config_hash(build_run_cfg(tagged))) == ("2129a3d194348235", "cbb6d66d251e1aa7")


def test_config_hash_ignores_display_options():
    a, b = build_run_cfg({"quiet": True}), build_run_cfg({"quiet": False})
    assert config_hash(a) == config_hash(b) != config_hash(build_run_cfg({"train": {"seed": 1}}))


@pytest.mark.parametrize("values,message", [
    ({"model": {"depth": 1.5}}, "model.depth=1.5 is not valid; it must be an integer"),
    ({"model": {"residual": "yes"}}, "model.residual='yes' is not valid; it must be true or false"),
    ({"optim": {"momentum": 1.0}}, "optim.momentum=1.0 is not valid; it must be in [0, 1)"),
    ({"train": {"steps": None}}, "train.steps=null is not valid; it must be an integer"),
    ({"data": {"name": "scaled", "scale_min": 10.0, "scale_max": 1.0}}, "data.scale_max=1.0"),
    ({"train": {"batch_size": 200}}, "train.batch_size=200 is not valid; it must be null or <= data.n_samples (100)"),
    ({"model": 3}, "model=3 is not valid; it must be a config group"),
    ({"nested": {"a": 1}}, "nested is not a known key"),
    ({"init": {"gain": float("inf")}}, "init.gain=inf"),
])
def test_bad_values_name_the_key(values, message):
    with pytest.raises(ConfigError) as e:
        build_run_cfg(values)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_int_accepted_for_float():
    assert InitCfg(gain=2).gain == 2 and build_run_cfg({"optim": {"lr": 1}}).optim.lr == 1.0


PRESET_GROUPS = [*((g, o) for g in ("init", "data", "optim", "model", "train", "verdict", "stats") for o in group_options(g)),
                 ("tune", "default")]


@pytest.mark.parametrize(("group", "option"), PRESET_GROUPS)
def test_a_preset_sets_only_what_differs_from_its_dataclass(group, option):
    """Defaults once: a preset's YAML starts from a base of its dataclass's defaults (gradsweep.config.store) and
    sets a key only where its value differs, so that a default changed in the dataclass changes every preset."""
    from omegaconf import OmegaConf

    from gradsweep.config.sections import SECTIONS
    from gradsweep.config.store import field_defaults
    from gradsweep.sweep.preflight import CONF_DIR

    own = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    bases = [d for d in own.pop("defaults") if isinstance(d, dict) and any(k.startswith("/gradsweep/base/") for k in d)]
    assert len(bases) == 1, f"{group}/{option}.yaml: no /gradsweep/base/{group} entry in its defaults"
    defaults = field_defaults(TuneCfg if group == "tune" else SECTIONS[group])
    repeated = {k: v for k, v in own.items() if k in defaults and v == defaults[k]}
    assert not repeated, f"{group}/{option}.yaml repeats its dataclass's defaults: {repeated}"


@pytest.mark.parametrize(("group", "option"), PRESET_GROUPS)
def test_every_key_of_a_composed_preset_is_a_field_valued_as_written(composed, group, option):
    """The composed preset: its keys are the dataclass's fields, each valued as the YAML sets it or else as the field's
    default (the base is no second copy of a default that could drift)."""
    from omegaconf import OmegaConf

    from gradsweep.config.sections import SECTIONS
    from gradsweep.config.store import field_defaults
    from gradsweep.sweep.preflight import CONF_DIR
    overrides = [f"+tune={option}"] if group == "tune" else [f"{group}={option}"]
    node = OmegaConf.to_container(composed(overrides)[group])
    own = OmegaConf.to_container(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"))
    defaults = field_defaults(TuneCfg if group == "tune" else SECTIONS[group])
    assert set(node) <= set(defaults), set(node) - set(defaults)
    for key, value in node.items():
        want = own.get(key, defaults[key])
        assert value == want or (key == "net" and option == "custom"), (key, value, want)
