"""Real sweeps for the report's tests: configurations trained (stacked per architecture) and written
like a multirun, one directory per job."""

from __future__ import annotations

import functools
import itertools
from pathlib import Path

from conftest import make_cfg

from gradsweep.engine.train import train_group
from gradsweep.results.store import write_tables
from gradsweep.results.tables import build_tables
from gradsweep.sweep.group import plan
from gradsweep.sweep.preflight import compose_values


def grid(**swept) -> list[dict]:
    """Every combination of the swept keys: grid(**{"model.depth": [2, 3], "init": ["xavier"]})."""
    keys = list(swept)
    return [dict(zip(keys, values)) for values in itertools.product(*(swept[k] for k in keys))]


@functools.cache
def _preset(group: str, name: str) -> dict:
    return compose_values([f"{group}={name}"])[group]


def _sections(point: dict, base: dict) -> dict:
    sections: dict = {k: dict(v) for k, v in base.items()}
    for key, value in point.items():
        if key in ("init", "data"):  # a preset, like init=xavier on the command line: composed by Hydra
            sections[key] = {**_preset(key, value), **sections.get(key, {})}
        else:
            section, field = key.split(".", 1)
            sections.setdefault(section, {})[field] = value
    return sections


def write_sweep(root: Path, points: list[dict], steps: int = 20, **base) -> Path:
    """Train every point (a dict of override keys) and write job directories 0..n-1 under ``root``."""
    base.setdefault("train", {})
    base["train"] = {"steps": steps, **base["train"]}
    cfgs = [make_cfg(**_sections(p, base)) for p in points]
    for idx in plan(cfgs, list(range(len(cfgs)))):  # trained per group, written per run (a basic-launcher layout)
        runs, steps_t = build_tables([cfgs[i] for i in idx], train_group([cfgs[i] for i in idx]),
                                     [{"job_num": i, "override_dirname": ",".join(f"{k}={v}" for k, v in points[i].items())}
                                      for i in idx])
        for row, i in enumerate(idx):
            rid = runs.run_id[row]
            write_tables(root / str(i), runs.iloc[[row]], steps_t[steps_t.run_id == rid])
    return root
