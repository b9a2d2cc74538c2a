"""A run's identity and its columns: its run_id (:func:`config_hash`), the config flattened into runs-table columns
(:func:`flatten`), and the fast copies of config dataclasses both are built from."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from typing import Any

from gradsweep.config.sections import ARRAYS_KEYS, MODULE_KEYS, SECTIONS, DataCfg, RunCfg, StatsCfg


def column_of(section: str, key: str) -> str:
    """A config value's column name: its override key, and for the model, init and data presets' names the group
    alone."""
    return section if (key == "name" and section in ("model", "init", "data")) else f"{section}.{key}"


_FIELD_NAMES: dict[type, tuple[str, ...] | None] = {}
_LEAVES = (str, int, float, bool, type(None))


def as_dict(obj: Any) -> Any:
    """``dataclasses.asdict``, the same result at a fifth of its cost (a sweep hashes and flattens every run):
    each class's fields are read once, and values that cannot be shared (lists, dicts, other objects) are copied
    as ``asdict`` copies them."""
    cls = type(obj)
    if cls in _LEAVES:
        return obj
    if cls not in _FIELD_NAMES:
        _FIELD_NAMES[cls] = (tuple(f.name for f in dataclasses.fields(obj))
                             if dataclasses.is_dataclass(obj) and not isinstance(obj, type) else None)
    names = _FIELD_NAMES[cls]
    if names is not None:
        return {name: as_dict(getattr(obj, name)) for name in names}
    if cls is list or cls is tuple:
        return cls(as_dict(v) for v in obj)
    if cls is dict:
        return {as_dict(k): as_dict(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def as_tuple(section: Any) -> tuple:
    """A config section's values in field order (``dataclasses.astuple`` for sections of plain values; a mapping,
    model.net, as its sorted JSON), a key to group or cache runs by."""
    return tuple(json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list)) else v
                 for v in as_dict(section).values())


def _dotted(prefix: str, node: dict[str, Any], out: dict[str, Any]) -> None:
    """``node``'s values as columns ``prefix.key`` (nested nodes dotted further; a list as its JSON text, a value
    a report can group by)."""
    for key, value in node.items():
        if isinstance(value, dict):
            _dotted(f"{prefix}.{key}", value, out)
        else:
            out[f"{prefix}.{key}"] = json.dumps(value) if isinstance(value, (list, tuple)) else value


def flatten(cfg: RunCfg) -> dict[str, Any]:
    """Every config value as a column named like its override key (``model.depth``, ``init``, ``optim.lr``...).

    The ``model``, ``init`` and ``data`` presets are named by their ``name`` field alone (``model``, ``init``,
    ``data``); ``model.net``'s arguments get a column each (``model.net.depth``).
    ``quiet`` is a display option and not recorded; ``device`` is recorded as the device actually used.
    """
    out: dict[str, Any] = {}
    for section in SECTIONS:
        for key, value in as_dict(getattr(cfg, section)).items():
            if isinstance(value, dict):  # model.net: a column per argument (model.net._target_, model.net.depth...)
                _dotted(column_of(section, key), value, out)
            elif value is not None or section != "model" or key not in MODULE_KEYS:
                out[column_of(section, key)] = value
    out["loss"] = cfg.loss
    out.update(cfg.extra)
    return out


# Keys added after sweeps were first written, with their defaults: a run that leaves them at those keeps the run_id
# it had before they existed (a sweep resumed across the change finds its runs).
ADDED_KEYS = {"data": ARRAYS_KEYS, "model": MODULE_KEYS,
              "stats": {f.name: f.default for f in dataclasses.fields(StatsCfg)}}


def config_hash(cfg: RunCfg) -> str:
    """A stable 16-hex-digit hash of everything that determines a run's result."""
    payload = as_dict(cfg)
    payload.pop("quiet")
    payload.pop("engine")  # the engines agree to rounding: a sweep resumed with another engine keeps its runs
    for section, added in ADDED_KEYS.items():  # keys newer than the first sweeps enter the hash only when set
        for key, default in added.items():
            if payload[section][key] == default:
                del payload[section][key]
    payload.pop("stats")  # what is measured, not what is trained: the sharpness changes no run's numbers
    if payload["data"]["name"] != "gaussian":  # derived from the data: hashed as the constants they were before
        payload["data"]["in_dim"], payload["data"]["out_dim"] = DataCfg.in_dim, DataCfg.out_dim
    if payload["data"]["name"] == "arrays":  # the file's content (data.digest), not how its path is spelled
        if not payload["data"]["digest"]:  # a programming error: two files would share one run_id
            raise ValueError("a data=arrays config has no run_id before it is bound to its file "
                             "(gradsweep.engine.arrays.bind_data)")
        del payload["data"]["path"]
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:16]
