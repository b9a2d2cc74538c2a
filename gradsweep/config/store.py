"""Defaults once: every default value of a preset comes from its dataclass in ``sections``, and the YAML files in
``gradsweep/conf/<group>/`` set only what differs.

Each preset's YAML starts from a base node registered here in Hydra's ConfigStore, ``gradsweep/base/<group>``:
the keys that preset carries (the MLP's block keys, an init scheme's arguments, ...), valued as the dataclass's field
defaults. A preset carries only its own keys, so that another preset's key stays an error naming the preset's
``--help``. The nodes are plain dicts, not structured configs: the dataclasses check every value with a one-line
error, and a typed node would send every job to Hydra's own ~100 ms composition (``gradsweep.sweep.compose``).
``tests/test_config.py`` checks that no YAML repeats a default and every preset key is a field.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any

from gradsweep.config.sections import DataCfg, InitCfg, ModelCfg, OptimCfg, StatsCfg, TrainCfg, VerdictCfg

_BLOCKS = ("depth", "width", "activation", "residual", "norm")
_DATA = ("name", "n_samples", "seed")

BASES: dict[str, tuple[type, dict[str, tuple[str, ...]]]] = {
    "model": (ModelCfg, {"blocks": _BLOCKS}),
    "init": (InitCfg, {
        "default": ("name", "scheme"),
        "xavier": ("name", "scheme", "distribution", "gain", "bias"),
        "kaiming": ("name", "scheme", "distribution", "a", "mode", "nonlinearity", "bias"),
        "normal": ("name", "scheme", "mean", "std", "bias"),
        "uniform": ("name", "scheme", "bound", "bias"),
        "orthogonal": ("name", "scheme", "gain", "bias"),
    }),
    "optim": (OptimCfg, {
        "sgd": ("name", "lr", "momentum", "weight_decay"),
        "adam": ("name", "lr", "weight_decay", "beta1", "beta2", "eps"),
    }),
    "train": (TrainCfg, {"default": tuple(f.name for f in fields(TrainCfg))}),
    "verdict": (VerdictCfg, {"default": tuple(f.name for f in fields(VerdictCfg))}),
    "stats": (StatsCfg, {"default": tuple(f.name for f in fields(StatsCfg))}),
    "data": (DataCfg, {
        "regression": (*_DATA, "noise", "n_features"),
        "scaled": (*_DATA, "noise", "n_features", "scale_min", "scale_max"),
        "gaussian": (*_DATA, "in_dim", "out_dim"),
        "digits": (*_DATA, "n_test"),
        "arrays": (*_DATA, "path", "target", "task", "n_test", "scale_target"),
    }),
}
"""group -> (its dataclass, base name -> the keys of the presets built on it)."""


def field_defaults(cls: type) -> dict[str, Any]:
    """``cls``'s field defaults as written in the class (not as ``__post_init__`` may settle them)."""
    out = {}
    for f in fields(cls):
        out[f.name] = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
    return out


def register_bases(group: str, cls: type, bases: dict[str, tuple[str, ...]]) -> None:
    """Store ``gradsweep/base/<group>/<name>`` for every base: its keys, valued as ``cls``'s defaults."""
    from hydra.core.config_store import ConfigStore

    defaults = field_defaults(cls)
    for name, keys in bases.items():
        ConfigStore.instance().store(group=f"gradsweep/base/{group}", name=name, provider="gradsweep",
                                     node={k: defaults[k] for k in keys})


def register() -> None:
    """Register the run config's bases; call before Hydra composes gradsweep's config (idempotent)."""
    for group, (cls, bases) in BASES.items():
        register_bases(group, cls, bases)
