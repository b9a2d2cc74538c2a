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

from gradsweep import load_sweep
from gradsweep.schema import GROUPS_DIR, RUNS_FILE

ROOT = Path(__file__).resolve().parent.parent
VARIES = ["wall_s", "group_size"]
STEPS = 2000
SWEEP = ["model.depth=2,3", "optim.lr=0.01,0.05", "train.seed=0,1", "quiet=true", f"train.steps={STEPS}"]  # 8 runs
SLURM = ["hydra/launcher=gradsweep_submitit_slurm", "hydra.launcher.partition=test", "hydra.launcher.timeout_min=10"]
BAR = re.compile(rf"train 4 runs:[^\r\n]*?(\d+)/{STEPS}")


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


def _kill_job_process(job_id: str) -> int:
    """SIGKILL the Python process a SLURM job runs (found by the SLURM_JOB_ID in its environment)."""
    killed = 0
    for proc in Path("/proc").iterdir():
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if f"SLURM_JOB_ID={job_id}".encode() in env and b"submitit.core._submit" in cmdline:
            os.kill(int(proc.name), signal.SIGKILL)
            killed += 1
    return killed


def _job_ids(sweep_dir: Path) -> list[str]:
    return sorted((p.name for p in (sweep_dir / ".submitit").iterdir() if p.name.isdigit()), key=int)


@pytest.fixture(scope="module")
def whole(slurm_env, tmp_path_factory) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The sweep through the default launcher, in this process's machine."""
    d = tmp_path_factory.mktemp("slurm") / "whole"
    out = _sweep([*SWEEP, f"hydra.sweep.dir={d}"], d.parent, slurm_env)
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
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=slurm_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + scaled(120)
    while time.monotonic() < deadline and proc.poll() is None:
        ids = _job_ids(d) if (d / ".submitit").is_dir() else []  # this sweep's jobs, not a finishing earlier test's
        queued = subprocess.run(["squeue", "-h", "-j", ",".join(ids), "-o", "%T"], env=slurm_env, capture_output=True,
                                text=True).stdout.split() if len(ids) == 4 else []
        if len(queued) == 4 and "RUNNING" in queued:
            break
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert len(_job_ids(d)) == 4 and not list((d / GROUPS_DIR).glob(f"*/{RUNS_FILE}"))

    out = subprocess.run(cmd, cwd=tmp_path, env=slurm_env, capture_output=True, text=True, timeout=scaled(600))
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stderr + out.stdout
    waited = re.search(r"Waiting for (\d+) SLURM job\(s\) an earlier start submitted", log)
    assert waited, log[-3000:]
    submitted = re.search(r"Submitted (\d+) group\(s\)", log)
    assert int(waited[1]) + (int(submitted[1]) if submitted else 0) <= 4
    jobs = _job_ids(d)  # none submitted twice: the groups finished meanwhile were skipped, the others waited for
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
    # Not quiet, and bars asked for although stderr is a file: each job's bar in its SLURM log says how far its group
    # has trained.
    proc = subprocess.Popen([*cmd, "quiet=false"], cwd=tmp_path, env={**slurm_env, "GRADSWEEP_PROGRESS": "1"},
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    killed = None
    deadline = time.monotonic() + scaled(300)
    while killed is None and time.monotonic() < deadline and proc.poll() is None:
        for log in (d / ".submitit").glob("*/*_0_log.err") if (d / ".submitit").is_dir() else []:
            steps = [int(n) for n in BAR.findall(log.read_text(errors="replace"))]
            if steps and STEPS // 3 <= steps[-1] <= 3 * STEPS // 4:  # its group a third to 3/4 trained
                killed = log.parent.name
                assert _kill_job_process(killed)
                break
        time.sleep(0.05)
    stdout, stderr = proc.communicate(timeout=scaled(600))
    assert killed is not None, "no job seen running"
    assert proc.returncode == 1, stderr[-3000:]
    err = [ln for ln in stderr.splitlines() if ln.startswith("gradsweep: error:")]
    assert len(err) == 1 and err[0].startswith("gradsweep: error: 4 of 8 runs failed"), stderr[-3000:]
    assert "the others are complete" in err[0]
    assert _final_states(slurm_env, [killed])[killed] == "FAILED"
    assert f"submitit job {killed} ended FAILED without a result" in err[0]
    assert len(list((d / GROUPS_DIR).glob(f"*/{RUNS_FILE}"))) == 1

    rerun = subprocess.run(cmd, cwd=tmp_path, env=slurm_env, capture_output=True, text=True, timeout=scaled(600))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "4 of 8 runs already complete" in rerun.stderr + rerun.stdout
    assert "Submitted 1 group(s) to submitit (slurm)" in rerun.stderr + rerun.stdout
    for got, want in zip(_tables(d), whole):
        pd.testing.assert_frame_equal(got, want)
