"""Hydra's and OmegaConf's private API is used in one module, gradsweep.hydra_shim, against the Hydra versions it
was checked with; overrides are parsed through it alone."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import tomllib
from packaging.specifiers import SpecifierSet

from gradsweep import hydra_shim

ROOT = Path(__file__).resolve().parent.parent
PRIVATE = re.compile(r"hydra\._internal|OverridesParser|_get_value_element_as_str|\._return_value|\._get_node\b"
                     r"|\._metadata\b")


def test_the_installed_hydra_is_one_the_shim_was_checked_against():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    declared = next(d for d in deps if d.startswith("hydra-core")).removeprefix("hydra-core")
    assert declared == hydra_shim.HYDRA_SUPPORTED
    assert version("hydra-core") in SpecifierSet(hydra_shim.HYDRA_SUPPORTED)


def test_no_other_module_reaches_into_hydra_or_omegaconf_internals():
    # The one exception, explained in the shim's docstring: the plugin module Hydra's scan imports subclasses
    # BasicSweeper at import, and may not import gradsweep to get it from the shim.
    allowed = {"hydra_plugins/gradsweep_launcher/sweeper.py": ["hydra._internal"]}
    for pkg in ("gradsweep", "hydra_plugins"):
        for path in (ROOT / pkg).rglob("*.py"):
            name = str(path.relative_to(ROOT))
            if name != "gradsweep/hydra_shim.py":
                assert sorted(set(PRIVATE.findall(path.read_text()))) == allowed.get(name, []), name


def test_each_private_use_still_works_on_this_hydra():
    from omegaconf import AnyNode, OmegaConf

    parsed = hydra_shim.parse_overrides(["model.depth=2,10", "init=xavier", "optim.lr='0.1'"])
    assert parsed[2].value() == "0.1"
    assert [o.key_or_group for o in parsed] == ["model.depth", "init", "optim.lr"]
    jobs = hydra_shim.basic_sweeper().split_arguments(parsed, None)
    assert [len(batch) for batch in jobs] == [2]
    assert hydra_shim.override_dirname(parsed[1:], [], ",", "=") == "init=xavier,optim.lr='0.1'"
    assert hydra_shim.value_text([1, "a b"]) == "[1,a\\ b]"  # as Hydra would parse it back
    cfg = OmegaConf.create({"a": {"b": 1}, "c": [2]})
    assert hydra_shim.schema_type(cfg.a) in (None, dict)
    assert isinstance(hydra_shim.child_node(cfg.a, "b"), AnyNode)
    assert isinstance(hydra_shim.child_node(cfg.c, 0), AnyNode)
    args = hydra_shim.args_parser().parse_args(["-m", "model.depth=2,10"])
    assert args.multirun and args.overrides == ["model.depth=2,10"]
