"""Sweeps written by an earlier version of gradsweep read the same today, and today's code writes the same tables.

``tests/fixtures/sweep_v2`` (a fused multirun) and ``tests/fixtures/run_v2`` (a single run) were written by the code
before the group layer moved (commit df40084), in float64, with

    python -m gradsweep -m model.depth=2,8 init=xavier,kaiming optim.lr=0.01,1.0 train.steps=20 train.dtype=float64
    python -m gradsweep model.depth=3 train.steps=20 train.dtype=float64
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from gradsweep import load_sweep
from gradsweep.config.sections import build_run_cfg
from gradsweep.engine.train import train_group
from gradsweep.results.schema import GROUPS_DIR, SCHEMA_VERSION
from gradsweep.results.store import write_tables
from gradsweep.results.tables import build_tables
from gradsweep.sweep.group import GroupJob, plan, run_group

FIXTURES = Path(__file__).parent / "fixtures"
SWEEP, RUN = FIXTURES / "sweep_v2", FIXTURES / "run_v2"
TIMING = ["wall_s"]  # the only columns that differ between two trainings of the same runs
# written since the fixtures (schema 3): read from them as null, and compared only there
NEW_IN_V3 = {"sharpness_init", "sharpness_iters", "sharpness_converged", "sharpness_final", "lr_edge_pred",
             "lr_edge_note", "lr_over_edge", "phase", "sharpness"}


def assert_tables_equal(a: pd.DataFrame, b: pd.DataFrame, diverged: set[str], key: str = "run_id") -> None:
    """Equal tables: every non-float column exactly; floats to rtol 1e-9 (float64; one BLAS may round the last bit
    differently from another's), and to 1e-6 in runs that diverged, whose growth multiplies that last bit."""
    assert list(a.columns) == list(b.columns)
    assert len(a) == len(b)
    a, b = a.reset_index(drop=True), b.reset_index(drop=True)
    loose = a[key].isin(diverged).to_numpy()
    for col in a.columns:
        if col in NEW_IN_V3:  # ``a`` is the fixture's
            assert a[col].isna().all(), col
            continue
        if col in TIMING:
            continue
        x, y = a[col], b[col]
        if pd.api.types.is_float_dtype(x) and pd.api.types.is_float_dtype(y):
            xv, yv = x.to_numpy(), y.to_numpy()
            assert np.array_equal(np.isnan(xv), np.isnan(yv)), col
            for mask, rtol in ((~loose, 1e-9), (loose, 1e-6)):
                np.testing.assert_allclose(xv[mask], yv[mask], rtol=rtol, atol=0, err_msg=col)
        elif col == "pred_chi":
            for u, v in zip(x, y):
                assert (u is None) == (v is None) or (len(u) == len(v) and np.allclose(u, v, rtol=1e-12)), col
        else:
            pd.testing.assert_series_equal(x, y, check_names=False, obj=col)


def test_old_sweep_loads():
    runs, steps = load_sweep(SWEEP)
    assert len(runs) == 8 and runs.attrs["schema_version"] == 2 < SCHEMA_VERSION
    assert runs["sharpness_init"].isna().all() and runs["phase"].isna().all() and steps["sharpness"].isna().all()
    assert runs["stats.sharpness"].all()  # the config keys added since: their defaults
    assert runs["run_dir"].tolist() == [str(i) for i in range(8)]
    assert set(runs["verdict"]) >= {"healthy", "diverged"}
    assert len(steps) and set(steps["run_id"]) == set(runs["run_id"])


def test_todays_code_writes_the_old_sweep_again(tmp_path):
    """Each fixture run's config (its .hydra/config.yaml) trained through today's group layer, written to the same
    layout: the tables load equal to the fixture's."""
    old_runs, old_steps = load_sweep(SWEEP)
    cfgs = [build_run_cfg({k: v for k, v in yaml.safe_load((SWEEP / d / ".hydra" / "config.yaml").read_text()).items()
                           if k != "hydra"}) for d in old_runs["run_dir"]]
    assert [c.train.dtype for c in cfgs] == ["float64"] * 8
    for chunk in plan(cfgs, list(range(len(cfgs)))):
        job = GroupJob(cfgs=[cfgs[i] for i in chunk],
                       meta=[{"job_num": int(old_runs["job_num"][i]), "override_dirname": old_runs["override_dirname"][i]}
                             for i in chunk],
                       run_dirs=[tmp_path / old_runs["run_dir"][i] for i in chunk],
                       job_files=[({}, []) for _ in chunk], output_subdir=".hydra",
                       group_dir=tmp_path / GROUPS_DIR / str(chunk[0]))
        assert all(f is None for f in run_group(job).failures)
    new_runs, new_steps = load_sweep(tmp_path)
    diverged = set(old_runs.loc[old_runs["verdict"] == "diverged", "run_id"])
    assert_tables_equal(old_runs, new_runs, diverged)
    assert_tables_equal(old_steps, new_steps, diverged)


def test_old_single_run_loads_and_is_written_again(tmp_path):
    old_runs, old_steps = load_sweep(RUN)
    assert len(old_runs) == 1 and old_runs["run_dir"].tolist() == ["."]
    values = yaml.safe_load((RUN / ".hydra" / "config.yaml").read_text())
    cfg = build_run_cfg({k: v for k, v in values.items() if k != "hydra"})
    runs, steps = build_tables([cfg], train_group([cfg]),
                               [{"job_num": None, "override_dirname": old_runs["override_dirname"][0]}])
    write_tables(tmp_path, runs, steps)
    new_runs, new_steps = load_sweep(tmp_path)
    assert_tables_equal(old_runs, new_runs, set())
    assert_tables_equal(old_steps, new_steps, set())


@pytest.mark.slow
def test_the_same_command_today_gives_equal_tables(tmp_path):
    """The fixture's own command, run by today's CLI into a new directory."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "gradsweep", "-m", "model.depth=2,8", "init=xavier,kaiming", "optim.lr=0.01,1.0",
           "train.steps=20", "train.dtype=float64", "quiet=true", f"hydra.sweep.dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    old_runs, old_steps = load_sweep(SWEEP)
    new_runs, new_steps = load_sweep(out)
    diverged = set(old_runs.loc[old_runs["verdict"] == "diverged", "run_id"])
    assert_tables_equal(old_runs, new_runs, diverged)
    assert_tables_equal(old_steps, new_steps, diverged)
    shutil.rmtree(out)
