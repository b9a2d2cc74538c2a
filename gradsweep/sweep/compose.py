"""Job configs of a sweep at a fraction of Hydra's cost, equal to what Hydra composes.

Hydra composes every job from scratch (~100 ms a job: defaults tree, YAML merges, struct flags).
Jobs that differ only in plain values share all of that work, so :class:`SweepComposer` composes
once per distinct combination of config-group choices, with Hydra's own ``load_sweep_config``,
and applies each job's value overrides to a plain copy of that template with the semantics of
Hydra's ``_apply_overrides_to_config``. Whatever it cannot show to be equal (hydra.* overrides,
packages, dict or list values, typed or interpolated nodes, an override Hydra would reject) it
hands to Hydra's own composition for that job. ``tests/test_compose.py`` checks job by job that
both give the same config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from omegaconf import AnyNode, DictConfig, OmegaConf, open_dict, read_write

from gradsweep.config.sections import RunCfg, build_section
from gradsweep.engine.arrays import bind_data, bound_run_cfg
from gradsweep.hydra_shim import child_node, override_dirname, overrides_parser, schema_type

_PRIMITIVES = (bool, int, float, str, type(None))


@dataclass
class JobConfig:
    """One composed job: its task config as a resolved plain dict, and what Hydra would record of it."""

    task: dict[str, Any]
    """The job's config without the ``hydra`` node, interpolations resolved."""
    unresolved: dict[str, Any]
    """The same before resolution, as Hydra saves it to .hydra/config.yaml."""
    overrides: list[str]
    """The job's task overrides (Hydra's hydra.overrides.task)."""
    override_dirname: str
    """Hydra's hydra.job.override_dirname for the job."""
    fast: bool
    """True when composed from a template, False when Hydra composed it."""


class _Fallback(Exception):
    """This job needs Hydra's own composition."""


def _plain(node: Any) -> bool:
    """True when every node below is an untyped DictConfig/ListConfig or AnyNode (no structured schema)."""
    if isinstance(node, DictConfig):
        if schema_type(node) not in (None, dict):
            return False
        return all(_plain(child_node(node, k)) for k in node.keys())
    if OmegaConf.is_list(node):
        return all(_plain(child_node(node, i)) for i in range(len(node)))
    return isinstance(node, AnyNode)


def _has_interpolation(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_interpolation(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_interpolation(v) for v in value)
    return isinstance(value, str) and "${" in value


class SweepComposer:
    """Compose the jobs of one sweep (``master``: the sweep's config, ``loader``: Hydra's config loader)."""

    def __init__(self, loader: Any, master: DictConfig):
        self.loader = loader
        self.master = master
        self.parser = overrides_parser()
        dirname_cfg = master.hydra.job.config.override_dirname
        self.dirname_args = (list(dirname_cfg.exclude_keys), dirname_cfg.item_sep, dirname_cfg.kv_sep)
        self._parsed: dict[str, Any] = {}
        self._is_group: dict[str, bool] = {}
        self._templates: dict[tuple[str, ...], dict[str, Any] | None] = {}
        self._open: dict[tuple[str, ...], set[str]] = {}  # per template: its dict nodes that take new keys
        self.n_fast = self.n_hydra = 0

    def _parse(self, line: str) -> Any:
        if line not in self._parsed:
            self._parsed[line] = self.parser.parse_override(line)
        return self._parsed[line]

    def _group(self, override: Any) -> bool:
        key = override.key_or_group
        if key not in self._is_group:
            self._is_group[key] = self.loader.repository.group_exists(key)
        return self._is_group[key] and not isinstance(override.value(), dict)

    def _template(self, groups: tuple[str, ...]) -> dict[str, Any] | None:
        """The task config composed by Hydra with these group overrides only; None if it is not plain."""
        if groups not in self._templates:
            cfg = self.loader.load_sweep_config(self.master, list(groups))
            task = {k: child_node(cfg, k) for k in cfg.keys() if k != "hydra"}  # the nodes: see _plain
            ok = all(_plain(node) for node in task.values())
            container = OmegaConf.to_container(cfg, resolve=False) if ok else None
            if container is not None:
                container.pop("hydra", None)
            self._templates[groups] = container
            self._open[groups] = {path for k, node in task.items() for path in _open_paths(node, k)} if ok else set()
        return self._templates[groups]

    def compose(self, overrides: list[str], idx: int = 0) -> JobConfig:
        """Job ``idx`` of the sweep (Hydra's hydra.job.num, which interpolations may read)."""
        parsed = [self._parse(line) for line in overrides]
        task_overrides = [o for o in parsed if not o.is_hydra_override()]
        dirname = override_dirname(task_overrides, *self.dirname_args)
        lines = [o.input_line for o in task_overrides]
        try:
            unresolved = self._fast(parsed)
            if _has_interpolation(unresolved):
                raise _Fallback
            self.n_fast += 1
            return JobConfig(unresolved, unresolved, lines, dirname, fast=True)
        except _Fallback:
            cfg = self.loader.load_sweep_config(self.master, list(overrides))
            with open_dict(cfg):
                cfg.hydra.job.id = idx
                cfg.hydra.job.num = idx
            self.n_hydra += 1
            unresolved = OmegaConf.to_container(cfg, resolve=False)
            unresolved.pop("hydra")
            settle_data_dims(cfg)  # ${data.in_dim} reads the data's size
            task = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k]
                    for k in cfg.keys() if k != "hydra"}
            return JobConfig(task, unresolved, lines, dirname, fast=False)

    def _fast(self, parsed: list[Any]) -> dict[str, Any]:
        groups, values = [], []
        for o in parsed:
            if o.is_hydra_override() or o.package is not None or o.is_sweep_override():
                raise _Fallback
            (groups if self._group(o) else values).append(o)
        key = tuple(o.input_line for o in groups)
        template = self._template(key)
        if template is None:
            raise _Fallback
        cfg = _copy(template)
        for o in values:
            _apply(cfg, o, self._open[key])
        return cfg


def _copy(node: Any) -> Any:
    """Deep copy of a plain config (dicts, lists, primitives): a fifth of ``copy.deepcopy``'s cost."""
    if isinstance(node, dict):
        return {k: _copy(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_copy(v) for v in node]
    return node


def _open_paths(node: Any, path: str) -> list[str]:
    """The dotted paths of the dict nodes at and below ``node`` that are not in struct mode (model=custom's
    ``model.net``): a plain override may add a key there, as Hydra lets it."""
    if not isinstance(node, DictConfig):
        return []
    here = [path] if OmegaConf.is_struct(node) is False else []
    return here + [p for k in node.keys() for p in _open_paths(child_node(node, k), f"{path}.{k}")]


def _apply(cfg: dict[str, Any], override: Any, open_paths: set[str] = frozenset()) -> None:
    """One value override on a plain config, as Hydra's ``_apply_overrides_to_config`` applies it to an
    untyped struct config (whose ``open_paths`` take new keys); anything else (and every case Hydra would reject)
    raises ``_Fallback``."""
    value = override.value()
    if not isinstance(value, _PRIMITIVES):
        raise _Fallback
    *parents, leaf = override.key_or_group.split(".")
    node = cfg
    create = override.is_add() or override.is_force_add()
    for name in parents:
        child = node.get(name)
        if child is None and create and name not in node:
            child = node[name] = {}
        if not isinstance(child, dict):
            raise _Fallback
        node = child
    if override.is_delete():
        if leaf not in node or node[leaf] is None or (value is not None and value != node[leaf]):
            raise _Fallback
        del node[leaf]
    elif override.is_add():
        if node.get(leaf) is not None:  # Hydra: "Could not append to config. An item is already at ..."
            raise _Fallback
        node[leaf] = value
    elif override.is_force_add():
        node[leaf] = value
    else:
        if isinstance(node.get(leaf), (dict, list)) or (leaf not in node and ".".join(parents) not in open_paths):
            raise _Fallback  # struct mode: the key must exist
        node[leaf] = value


def settle_data_dims(cfg: Any) -> None:
    """Set a composed config's (a DictConfig's) data.in_dim and data.out_dim to its data's sizes before it is
    resolved, so that ``${data.in_dim}`` and ``${data.out_dim}`` anywhere in it read them (data=arrays: from its
    file)."""
    data = cfg.get("data") if OmegaConf.is_dict(cfg) else None
    if not OmegaConf.is_dict(data) or data.get("name") == "gaussian":
        return
    settled = bind_data(build_section("data", OmegaConf.to_container(data, resolve=True)))
    with read_write(data), open_dict(data):
        data.in_dim, data.out_dim = settled.in_dim, settled.out_dim


def to_run_cfg(cfg: Any) -> RunCfg:
    """Convert Hydra's composed config (a ``DictConfig``) into a bound :class:`RunCfg`. The one conversion point."""
    settle_data_dims(cfg)
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    return bound_run_cfg(values)
