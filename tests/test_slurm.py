"""Sweeps on a real SLURM cluster: hydra/launcher=gradsweep_submitit_slurm submits one fused group per SLURM job.

The cluster is GRADSWEEP_SLURM_CONF's (.ci/run starts one), else a throwaway one-node cluster started here by
scripts/slurm_test_cluster.sh (slurmctld, slurmd, slurmdbd on MariaDB, MUNGE), else the tests are skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import scaled
from holding import GATED_MODEL, Reading, gated, gated_pids, wait

from gradsweep import load_sweep
from gradsweep.results.schema import GROUPS_DIR, RUNS_FILE

ROOT = Path(__file__).resolve().parent.parent
VARIES = ["wall_s", "group_size"]
# 8 runs of a module that waits while a gate file exists (tests/holding.py): jobs are killed at a point of theirs
SWEEP = [*GATED_MODEL, "model.net.depth=2,3", "optim.lr=0.01,0.05", "train.seed=0,1", "quiet=true", "train.steps=200"]
SLURM = ["hydra/launcher=gradsweep_submitit_slurm", "hydra.launcher.partition=test", "hydra.launcher.timeout_min=10"]


def _free_base_port() -> int:
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + 3 < 65536 and all(_port_free(base + k) for k in range(1, 4)):
            return base
    raise RuntimeError("no four free ports in a row")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture(scope="module")
def slurm_env():
    """The environment a SLURM client needs: SLURM_CONF of a running cluster."""
    if os.environ.get("GRADSWEEP_SLURM_CONF"):
        yield {**os.environ, "SLURM_CONF": os.environ["GRADSWEEP_SLURM_CONF"]}
        return
    if os.geteuid() != 0 or not (shutil.which("slurmctld") or Path("/usr/sbin/slurmctld").exists()):
        pytest.skip("no SLURM here (apt-get install slurmctld slurmd slurm-client slurmdbd munge mariadb-server as "
                    "root; .ci/run does)")
    d = tempfile.mkdtemp(prefix="gradsweep-slurm-")
    script = ROOT / "scripts" / "slurm_test_cluster.sh"
    started = subprocess.run(["bash", str(script), d, str(_free_base_port())], capture_output=True, text=True)
    if started.returncode:
        pytest.fail(f"the test cluster did not start: {started.stderr}")
    yield {**os.environ, "SLURM_CONF": started.stdout.strip()}
    subprocess.run(["bash", str(script), "--stop", d], check=False, capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


def _sweep(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradsweep", "-m", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=scaled(600))


def _tables(d: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs, steps = load_sweep(d)
    return (runs.drop(columns=VARIES).sort_values("run_id").reset_index(drop=True),
            steps.sort_values(["run_id", "step", "layer"]).reset_index(drop=True))


def _sacct(env: dict, job_ids: list[str]) -> dict[str, str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,JobName,State", "-j", ",".join(job_ids)], env=env,
                         capture_output=True, text=True, check=True).stdout
    return {f[0]: f[2] for f in (line.split("|") for line in out.splitlines()) if f[1] == "gradsweep"}


def _final_states(env: dict, job_ids: list[str]) -> dict[str, str]:
    """Job states once SLURM has finished them (a job may still read RUNNING for a moment after its result is in)."""
    for _ in range(100):
        states = _sacct(env, job_ids)
        if len(states) == len(job_ids) and not {"PENDING", "RUNNING", "COMPLETING"} & set(states.values()):
            break
        time.sleep(0.3)
    return states


def _slurm_job(pid: int) -> str:
    """The SLURM job a process belongs to (SLURM_JOB_ID in its environment)."""
    env = dict(v.split(b"=", 1) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in v)
    return env[b"SLURM_JOB_ID"].decode()


def _job_ids(sweep_dir: Path) -> list[str]:
    return sorted((p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()), key=int)


def _submitted(sweep_dir: Path) -> list[str]:
    """The jobs whose submission is complete (submitit makes a job's folder first, then moves its pickle in)."""
    folder = sweep_dir / ".submitit"
    return [j for j in _job_ids(sweep_dir) if any((folder / j).glob("*_submitted.pkl"))] if folder.is_dir() else []


@pytest.fixture(scope="module")
def whole(slurm_env, tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The sweep through the default launcher, in this process's machine."""
    d = tmp_path_factory.mktemp("slurm") / "whole"
    env, _ = gated(d.parent, slurm_env)
    out = _sweep([*SWEEP, f"hydra.sweep.dir={d}"], d.parent, env)
    assert out.returncode == 0, out.stderr[-3000:]
    return _tables(d)


@pytest.mark.slow
def test_a_sweep_on_slurm_survives_its_command_being_killed(tmp_path, slurm_env, whole):
    """Submit 4 groups, SIGKILL the submitting command (a dropped login session) while its jobs are queued and
    running, run it again: it waits for the jobs still in SLURM instead of submitting their groups again, and the
    sweep is the default launcher's, one SLURM job per group."""
    d = tmp_path / "slurm"
    cmd = [sys.executable, "-m", "gradsweep", "-m", *SWEEP, *SLURM, "hydra.launcher.max_group_runs=2",
           f"hydra.sweep.dir={d}"]
    env, gate = gated(tmp_path, slurm_env)
    gate.touch()  # the jobs that start training wait there: all four stay in SLURM until the rerun has seen them
    try:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait(lambda: gated_pids(tmp_path) and len(_submitted(d)) == 4, proc)
        proc.kill()
        proc.wait()
        assert gated_pids(tmp_path), "no job seen training"
        assert len(_submitted(d)) == 4 and not list((d / GROUPS_DIR).glob(f"*/{RUNS_FILE}"))
        rerun = Reading(cmd, cwd=tmp_path, env=env)
        wait(lambda: rerun.saw("Waiting for"), rerun.proc)
    finally:
        gate.unlink()
    status, log = rerun.finish(600)
    assert status == 0, log[-3000:]
    waited = re.search(r"Waiting for (\d+) SLURM job\(s\) an earlier start submitted", log)
    assert waited and int(waited[1]) == 4, log[-3000:]
    assert "Submitted" not in log, log[-3000:]
    jobs = _job_ids(d)  # none submitted twice
    assert len(jobs) == 4 and set(_final_states(slurm_env, jobs).values()) == {"COMPLETED"}
    assert len(list((d / GROUPS_DIR).glob(f"*/{RUNS_FILE}"))) == 4
    for got, want in zip(_tables(d), whole):
        pd.testing.assert_frame_equal(got, want)


@pytest.mark.slow
def test_a_killed_slurm_job_fails_its_runs_and_a_rerun_finishes_them(tmp_path, slurm_env, whole):
    """SIGKILL the process of one group's job while it trains (what the OOM killer does; a plain scancel sends
    SIGTERM, through which submitit lets the job finish): its runs fail (one line, exit 1), the other group
    completes; the same command again trains only that group, and the sweep equals an uninterrupted one."""
    d = tmp_path / "slurm"
    cmd = [sys.executable, "-m", "gradsweep", "-m", *SWEEP, *SLURM, "hydra.launcher.max_group_runs=4",
           f"hydra.sweep.dir={d}"]
    env, gate = gated(tmp_path, slurm_env)
    gate.touch()
    try:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait(lambda: gated_pids(tmp_path), proc)
        assert gated_pids(tmp_path), "no job seen training"
        pid = gated_pids(tmp_path)[0]  # the Python process of the first job to train, held in its training
        killed = _slurm_job(pid)
        os.kill(pid, signal.SIGKILL)
    finally:
        gate.unlink()  # the other group's job trains on
    stdout, stderr = proc.communicate(timeout=scaled(600))
    assert proc.returncode == 1, stderr[-3000:]
    err = [ln for ln in stderr.splitlines() if ln.startswith("gradsweep: error:")]
    assert len(err) == 1 and err[0].startswith("gradsweep: error: 4 of 8 runs failed"), stderr[-3000:]
    assert "the others are complete" in err[0]
    assert _final_states(slurm_env, [killed])[killed] == "FAILED"
    assert f"submitit job {killed} ended FAILED without a result" in err[0]
    assert len(list((d / GROUPS_DIR).glob(f"*/{RUNS_FILE}"))) == 1

    rerun = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=scaled(600))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "4 of 8 runs already complete" in rerun.stderr + rerun.stdout
    assert "Submitted 1 group(s) to submitit (slurm)" in rerun.stderr + rerun.stdout
    for got, want in zip(_tables(d), whole):
        pd.testing.assert_frame_equal(got, want)
