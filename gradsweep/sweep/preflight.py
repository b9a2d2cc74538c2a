"""Check the command line before Hydra creates any directory.

Hydra reports a bad group choice or a bad value only once it composes the job, after the sweep
directory exists, and in several lines. This module reads the same overrides with Hydra's own
parser, checks every value of every sweep against the schemas, composes the first job once, and
turns the first problem found into one line naming the key, the value and what is valid.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from gradsweep.config.sections import (
    SECTIONS,
    TOP_LEVEL,
    ConfigError,
    build_section,
    first_line,
)
from gradsweep.config.store import register
from gradsweep.engine.arrays import bind_data, bound_run_cfg
from gradsweep.hydra_shim import value_text
from gradsweep.sweep.compose import settle_data_dims

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"  # inside the package, so that a wheel carries it
GROUPS = ("model", "init", "optim", "train", "data", "verdict", "stats", "experiment")


def group_options(group: str) -> list[str]:
    """The presets of a config group, from the YAML files in ``gradsweep/conf/<group>/``."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _values(override: Any) -> list[Any]:
    """Every value an override takes: one, or each of its sweep (interval sweeps: none to check)."""
    if override.is_delete():
        return []
    if override.is_sweep_override():
        try:
            return list(override.sweep_iterator())
        except Exception:  # interval() sweeps are for samplers and cannot be listed
            return []
    return [override.value()]


def _fields(section: str) -> list[str]:
    """The keys of config section ``section`` (model: depth, width, ...)."""
    return [f.name for f in dataclasses.fields(SECTIONS[section])]


def _check_append(o) -> None:
    """``+key=v`` appends a key the config lacks; for one it has (every config key and preset group but
    experiment) Hydra refuses in six lines: here one, which says to drop the ``+``."""
    from hydra.core.override_parser.types import OverrideType

    if o.type is not OverrideType.ADD:
        return
    key = o.key_or_group
    section, _, field = key.partition(".")
    known = (key in GROUPS and key != "experiment") or (
        section in SECTIONS and "." not in field and field in _fields(section))
    if known:
        raise ConfigError(f"+{key} appends a key the config lacks, and {key} is in it already: drop the + "
                          f"({o.input_line.lstrip('+')})")


def check_overrides(overrides: list[str], multirun: bool = True) -> None:
    """Raise :class:`ConfigError` for the first bad override in ``overrides`` (Hydra override strings): names
    first (an unknown key or preset is reported before anything is composed), then every value of every sweep in
    the context of the first job, then the first job whole.

    Without ``multirun`` (no ``-m``) a sweep (``key=a,b``) is an error, which Hydra reports in six lines on
    'Ambiguous value': here one line that says to add ``-m``.
    """
    from hydra.errors import HydraException

    from gradsweep.hydra_shim import parse_overrides

    try:
        parsed = parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(first_line(e)) from None
    for o in parsed if not multirun else []:
        if o.is_sweep_override():
            raise ConfigError(f"{o.input_line} is a sweep, which needs -m: python -m gradsweep -m {' '.join(overrides)}")
    own = [o for o in parsed if not o.key_or_group.startswith("hydra") and o.package is None]
    for o in own:
        _check_name(o)
    for o in parsed:  # how runs are computed is not a sweep axis: both engines give the runs the same run_id
        if o.key_or_group == "engine" and len(set(map(str, _values(o)))) > 1:
            raise ConfigError(f"{o.input_line}: engine cannot be swept (the engines compute the same runs, to rounding, "
                              "under one run_id); give one value, and compare them with scripts/bench_peers.py")
    base = _compose_first_job(parsed)
    for o in own:
        for value in _values(o):
            if not (isinstance(value, str) and "${" in value):  # an interpolation: checked resolved, in the job
                _check_value(o, value, parsed, base)
    if base:
        _check_job(bound_run_cfg(base))


def _check_name(o: Any) -> None:
    """A key of a config section, or a group's preset, that exists (or a ``+`` that appends one)."""
    key = o.key_or_group
    _check_append(o)
    section, _, field = key.partition(".")
    if field and section in SECTIONS and "." not in field:
        known = _fields(section)
        if field not in known:
            raise ConfigError(f"{key} is not a known key; valid keys: {', '.join(section + '.' + k for k in known)}")
    elif key in GROUPS:
        valid = group_options(key)
        for value in _values(o):
            if not isinstance(value, dict) and value not in valid:
                raise ConfigError(f"{key}={value!r} is not valid; valid values: {', '.join(valid)}")


def _check_value(o: Any, value: Any, parsed: list[Any], base: dict[str, Any]) -> None:
    """One value of override ``o``, checked in the first job's context ``base``: its section built with it, a
    module built and run on the data it would train on, a model or data preset's job composed whole."""
    key = o.key_or_group
    if "." in key and key.split(".", 1)[0] in SECTIONS:
        section, field = key.split(".", 1)
        checked = build_section(section, _with(base.get(section, {}), field, value))
        if (section in ("model", "data") or key == "train.batch_size") and base:  # a module, run on the data
            model = checked if section == "model" else build_section("model", base["model"])
            data = bind_data(checked if section == "data" else build_section("data", base["data"]))
            train = checked if section == "train" else build_section("train", base["train"])
            check_module(model, data, train.batch_size)
    elif key in TOP_LEVEL:
        bound_run_cfg({**base, key: value})
    elif key in ("model", "data") and base and len(_values(o)) > 1:  # each model and data preset's job whole
        job = bound_run_cfg(compose_values([line if other is not o else f"{key}={value_text(value)}"
                                            for line, other in zip(_first_job(parsed), parsed)
                                            if line is not None or other is o]))
        check_module(job.model, job.data, job.train.batch_size)


def _check_job(cfg: Any) -> None:
    """The first job whole: its module on its data, its device, and a compiled engine's compiler."""
    check_module(cfg.model, cfg.data, cfg.train.batch_size)
    if cfg.device == "cuda":
        from gradsweep.engine.device import resolve_device

        resolve_device("cuda")
    if cfg.engine == "compiled" and cfg.device != "cuda":
        import torch

        from gradsweep.engine.compiled import resolve_engine

        device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else "cpu")
        resolve_engine("compiled", 2, cfg.train.steps, cfg.train.dtype, device)  # no C++ compiler: one line


def check_module(model: Any, data: Any, batch_size: int | None) -> None:
    """A module-built net (model=cnn, resmlp, custom) built and run on the data's sizes, and on one sample where a
    step sees one: gradsweep.engine.nets' one-line errors (nothing to do for the MLP, whose keys the schema checks)."""
    if model.name != "mlp":
        from gradsweep.engine.nets import check_batch, describe

        describe(model, data.in_dim, data.out_dim)
        check_batch(model, data.in_dim, data.out_dim, batch_size)


def _with(values: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of a section's ``values`` with ``dotted`` (``depth``, or ``net.depth`` below a mapping) set."""
    out = dict(values)
    node = out
    *parents, leaf = dotted.split(".")
    for name in parents:
        node[name] = dict(node[name]) if isinstance(node.get(name), dict) else {}
        node = node[name]
    node[leaf] = value
    return out


def _compose_first_job(parsed: list[Any]) -> dict[str, Any]:
    """Compose the sweep's first job with Hydra's compose API, as a plain dict (``hydra`` removed)."""
    return compose_values([line for line in _first_job(parsed) if line is not None])


def _first_job(parsed: list[Any]) -> list[str | None]:
    """The sweep's first job's override for each of ``parsed`` (None: an interval sweep, which has no values)."""
    first: list[str | None] = []
    for o in parsed:
        if o.is_sweep_override():
            values = _values(o)
            if not values:
                first.append(None)
                continue
            text = value_text(values[0])
            prefix = {"ADD": "+", "FORCE_ADD": "++"}.get(o.type.name, "")
            first.append(f"{prefix}{o.get_key_element()}={text}")
        else:
            first.append(o.input_line)
    return first


def compose_values(overrides: list[str]) -> dict[str, Any]:
    """Compose ``gradsweep/conf/`` with Hydra's compose API into a plain resolved dict (``hydra`` removed); a config
    Hydra rejects becomes a one-line :class:`ConfigError`."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    register()  # the presets' bases, valued as the dataclasses' defaults
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(one_line(e)) from None
    finally:
        GlobalHydra.instance().clear()
    settle_data_dims(cfg)  # ${data.in_dim} reads the data's size
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    return values


def one_line(e: Exception) -> str:
    """A Hydra composition error as one line; a missing group option names the group's valid values."""
    text = first_line(e)
    if "Could not find" in text and "/" in text:
        group = text.rsplit("'", 2)[-2].split("/")[0]
        if group in GROUPS:
            name = text.rsplit("'", 2)[-2].split("/", 1)[1]
            return f"{group}={name!r} is not valid; valid values: {', '.join(group_options(group))}"
    if text.startswith("Could not override '") and "not in struct" in str(e.__cause__):  # another preset's key
        key = text.split("'")[1]
        group = key.partition(".")[0]
        return (f"{key} is not a key of the chosen {group} preset; its keys: python -m gradsweep {group}=<preset> "
                "--help")
    return text

