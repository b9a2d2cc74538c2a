"""The fused launcher: Hydra's conformance suites, and a fused sweep equal to the basic launcher's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import scaled
from holding import GATED_MODEL, Reading, gated, gated_pids, wait
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

from gradsweep import load_sweep


@pytest.fixture(autouse=True)
def hydra_version_base_unset():
    """Hydra's suites expect a process where no app has set a version_base yet (so jobs chdir, as in 1.1);
    earlier tests in this session composed gradsweep's config with version_base=1.3."""
    from hydra import version

    base = version.VersionBase.instance()
    saved = base.getbase()
    base.version_base = version._UNSPECIFIED_
    yield
    base.version_base = saved


@pytest.mark.parametrize("launcher_name, overrides", [("gradsweep", [])])
class TestFusedLauncher(LauncherTestSuite):
    """Any task that is not gradsweep's runs job by job, as Hydra's basic launcher runs it."""


@pytest.mark.parametrize("task_launcher_cfg, extra_flags",
                         [({}, ["-m", "hydra/launcher=gradsweep"]), ({}, ["-m", "hydra/launcher=gradsweep",
                                                                           "hydra/sweeper=gradsweep"])])
@pytest.mark.slow  # Hydra's integration suite runs each app in a subprocess
class TestFusedLauncherIntegration(IntegrationTestSuite):
    pass


def _sweep(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradsweep", "-m", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=scaled(600), env={**os.environ, "HYDRA_FULL_ERROR": "1"})


SWEEP = ["model.depth=2,5", "init=xavier,kaiming,large", "optim.lr=0.01,0.05", "train.clip_norm=null,1.0",
         "train.steps=40", "train.dtype=float64", "quiet=true"]


@pytest.mark.slow
def test_fused_sweep_reads_like_the_basic_one(tmp_path):
    fused = _sweep([*SWEEP, f"hydra.sweep.dir={tmp_path / 'fused'}"], tmp_path)
    assert fused.returncode == 0, fused.stderr[-3000:]
    assert "fused" in fused.stderr + fused.stdout
    basic = _sweep([*SWEEP, "hydra/launcher=basic", "hydra/sweeper=basic", f"hydra.sweep.dir={tmp_path / 'basic'}"],
                   tmp_path)
    assert basic.returncode == 0, basic.stderr[-3000:]
    (rf, sf), (rb, sb) = load_sweep(tmp_path / "fused"), load_sweep(tmp_path / "basic")
    assert len(rf) == len(rb) == 24 and (rf["group_size"] > 1).all() and (rb["group_size"] == 1).all()
    exact = [c for c in rb.columns if c not in ("wall_s", "group_size") and not pd.api.types.is_float_dtype(rb[c])]
    pd.testing.assert_frame_equal(rf[exact], rb[exact])
    for col in [c for c in rb.columns if pd.api.types.is_float_dtype(rb[c]) and c != "wall_s"]:
        np.testing.assert_allclose(rf[col], rb[col], rtol=1e-10, err_msg=col)
    pd.testing.assert_frame_equal(sf.drop(columns=[c for c in sf.columns if sf[c].dtype == float]),
                                  sb.drop(columns=[c for c in sb.columns if sb[c].dtype == float]))
    for col in [c for c in sf.columns if sf[c].dtype == float]:
        np.testing.assert_allclose(sf[col], sb[col], rtol=1e-10, atol=1e-300, err_msg=col)
    # The runs index the fused launcher writes from memory reads the same as the run files themselves.
    from gradsweep.results.schema import RUNS_INDEX
    from gradsweep.results.store import load_runs

    assert (tmp_path / "fused" / RUNS_INDEX).exists()
    from_index = load_runs(tmp_path / "fused")
    (tmp_path / "fused" / RUNS_INDEX).unlink()
    pd.testing.assert_frame_equal(from_index, load_runs(tmp_path / "fused"))
    for job in ("0", "23"):  # each run looks like a Hydra job
        assert (tmp_path / "fused" / job / ".hydra" / "config.yaml").exists()
        assert (tmp_path / "fused" / job / ".hydra" / "overrides.yaml").read_text() == \
            (tmp_path / "basic" / job / ".hydra" / "overrides.yaml").read_text()
        from omegaconf import OmegaConf

        assert OmegaConf.load(tmp_path / "fused" / job / ".hydra" / "config.yaml") == \
            OmegaConf.load(tmp_path / "basic" / job / ".hydra" / "config.yaml")


@pytest.mark.slow
def test_a_bad_job_fails_the_fused_sweep_before_any_trains(tmp_path):
    out = _sweep(["data=scaled,regression", "data.n_features=4", "train.steps=2", "quiet=true",
                  f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("gradsweep: error: data.n_features=4 is not valid")
    assert not list((tmp_path / "sweep").rglob("runs.parquet"))


@pytest.mark.slow
def test_groups_split_at_the_cap_and_give_the_same_numbers(tmp_path):
    sweep = ["optim.lr=0.01,0.02,0.05,0.1", "train.seed=0,1", "train.steps=15", "quiet=true"]
    capped = _sweep([*sweep, "hydra.launcher.max_group_runs=3", f"hydra.sweep.dir={tmp_path / 'capped'}"], tmp_path)
    assert capped.returncode == 0, capped.stderr[-3000:]
    whole = _sweep([*sweep, f"hydra.sweep.dir={tmp_path / 'whole'}"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    (rc, sc), (rw, sw) = load_sweep(tmp_path / "capped"), load_sweep(tmp_path / "whole")
    assert sorted(rc["group_size"]) == [2, 2, 3, 3, 3, 3, 3, 3] and set(rw["group_size"]) == {8}
    pd.testing.assert_frame_equal(sc, sw)  # bit for bit: a run's numbers do not depend on its group
    assert "group 3/3" in (tmp_path / "capped" / "gradsweep.log").read_text()


@pytest.mark.slow
def test_a_run_that_cannot_be_written_fails_alone(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "1").write_text("a file where job 1's directory should be")
    out = _sweep(["optim.lr=0.01,0.02,0.05", "train.steps=5", "quiet=true", f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert out.returncode == 1
    err = [ln for ln in out.stderr.splitlines() if ln.startswith("gradsweep: error:")]
    assert len(err) == 1 and "1 of 3 runs failed" in err[0] and "NotADirectoryError" in err[0]  # after all ran
    assert "2 runs in " in out.stdout  # the summary of what did complete
    runs, steps = load_sweep(sweep_dir)
    assert runs.run_dir.tolist() == ["0", "2"] and set(steps.run_id) == set(runs.run_id)


def test_groups_are_sized_from_free_device_memory(cfg_factory):
    from gradsweep.engine.device import DEVICE_MEMORY_SHARE, device_bytes_per_run
    from gradsweep.sweep.group import runs_per_group

    cfg = cfg_factory(train={"steps": 200})
    per_run = device_bytes_per_run(cfg)
    assert runs_per_group(cfg, 1.0, None, None) == runs_per_group(cfg, 1.0, None, 10**15)  # host limit binds
    assert runs_per_group(cfg, 1.0, None, 100 * per_run) == int(100 * DEVICE_MEMORY_SHARE)
    assert runs_per_group(cfg, 1.0, 7, 100 * per_run) == 7
    assert runs_per_group(cfg, 1.0, None, per_run // 10) == 1  # never zero: one run per group at least
    wide = cfg_factory(model={"width": 64}, train={"steps": 200, "dtype": "float64"})
    assert device_bytes_per_run(wide) > 20 * per_run  # 41x the parameters, 6.4x the activations, twice the bytes


@pytest.mark.slow
def test_submitit_launchers_give_the_default_launchers_sweep(tmp_path):
    """hydra-submitit-launcher's local executor (one run per submitted job), and gradsweep's own submitit
    launcher (one fused group per submitted job: what SLURM gets with hydra/launcher=gradsweep_submitit_slurm)."""
    sweep = ["model.depth=2,3", "optim.lr=0.01,0.05", "train.clip_norm=1", "train.steps=15", "quiet=true"]
    want_runs, want_steps = None, None
    for launcher in ("gradsweep", "submitit_local", "gradsweep_submitit_local"):
        args = sweep
        out = _sweep([*args, f"hydra/launcher={launcher}", f"hydra.sweep.dir={tmp_path / launcher}"], tmp_path)
        assert out.returncode == 0, out.stderr[-3000:]
        runs, steps = load_sweep(tmp_path / launcher)
        runs = runs.drop(columns=["wall_s", "group_size"]).sort_values("run_id").reset_index(drop=True)
        steps = steps.sort_values(["run_id", "step", "layer"]).reset_index(drop=True)
        if launcher == "gradsweep_submitit_local":
            assert len(list((tmp_path / launcher / "groups").glob("*/runs.parquet"))) == 2  # a group per depth
            assert list((tmp_path / launcher / ".submitit").iterdir())  # submitit's job folders
        if want_runs is None:
            want_runs, want_steps = runs, steps
            continue
        pd.testing.assert_frame_equal(runs, want_runs)
        pd.testing.assert_frame_equal(steps, want_steps)


@pytest.mark.slow
def test_same_fused_sweep_same_bytes(tmp_path):
    """Same command, same seeds, same CPU: every group's steps file byte for byte; the runs files equal but for
    wall_s (the only time they hold)."""
    sweep = ["model.depth=2,3", "optim.lr=0.01,0.05", "train.seed=0,1", "train.steps=20", "quiet=true"]
    for name in ("a", "b"):
        out = _sweep([*sweep, f"hydra.sweep.dir={tmp_path / name}"], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a" / "groups").glob("*/steps.parquet"))
    assert len(files) == 2
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    ra, rb = load_sweep(tmp_path / "a")[0], load_sweep(tmp_path / "b")[0]
    pd.testing.assert_frame_equal(ra.drop(columns="wall_s"), rb.drop(columns="wall_s"))


@pytest.mark.slow
def test_a_local_submitit_sweep_survives_its_command_being_killed(tmp_path):
    """submitit's local jobs outlive the command that started them: SIGKILL it while they train, run it again,
    and it waits for them instead of training their groups a second time."""
    import re

    env, gate = gated(tmp_path)
    sweep = [*GATED_MODEL, "model.net.depth=2,3", "train.steps=200", "quiet=true"]  # two groups: two submitit jobs
    base = subprocess.run([sys.executable, "-m", "gradsweep", "-m", *sweep, f"hydra.sweep.dir={tmp_path / 'base'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=scaled(600), env=env)
    assert base.returncode == 0, base.stderr[-2000:]
    d = tmp_path / "local"
    cmd = [sys.executable, "-m", "gradsweep", "-m", *sweep, "hydra/launcher=gradsweep_submitit_local",
           f"hydra.sweep.dir={d}"]

    def job_dirs() -> list[Path]:
        return [p for p in (d / ".submitit").glob("*") if p.name.isdigit()] if (d / ".submitit").is_dir() else []

    gate.touch()
    try:
        proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        wait(lambda: len(gated_pids(tmp_path)) == 2, proc)
        proc.kill()
        proc.wait()
        assert len(gated_pids(tmp_path)) == 2, "both jobs should be training, held at the gate"
        rerun = Reading(cmd, cwd=tmp_path, env=env)
        wait(lambda: rerun.saw("Waiting for"), rerun.proc)
    finally:
        gate.unlink()  # the held jobs go on
    status, out = rerun.finish(300)
    assert status == 0, out[-3000:]
    waited = re.search(r"Waiting for (\d+) local submitit job\(s\) an earlier start submitted", out)
    assert waited and int(waited[1]) == 2, out[-3000:]
    assert len(job_dirs()) == 2  # no group submitted twice
    runs, steps = load_sweep(d)
    want_runs, want_steps = load_sweep(tmp_path / "base")
    pd.testing.assert_frame_equal(runs.drop(columns=["wall_s"]).sort_values("run_id").reset_index(drop=True),
                                  want_runs.drop(columns=["wall_s"]).sort_values("run_id").reset_index(drop=True))
    key = ["run_id", "step", "layer"]
    pd.testing.assert_frame_equal(steps.sort_values(key).reset_index(drop=True),
                                  want_steps.sort_values(key).reset_index(drop=True))
