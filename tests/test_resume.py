"""Kill a real sweep with SIGKILL, rerun the same command into the same directory: every run exactly once,
results equal to an uninterrupted sweep's."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import scaled
from holding import held, wait

from gradsweep import load_sweep
from gradsweep.results.schema import GROUPS_DIR, RUNS_FILE
from gradsweep.results.store import completed_runs

pytestmark = pytest.mark.slow  # real sweeps in subprocesses, killed and rerun

STEPS = 600
SWEEP = ["model.depth=2,3", "optim.lr=0.01,0.02,0.05", "train.seed=range(0,4)", f"train.steps={STEPS}",
         "hydra.launcher.max_group_runs=4"]  # 24 runs in 6 groups of 4, each training for about half a second
VARIES = ["wall_s", "group_size"]  # how a run was trained alongside others, not what it computed


def _cmd(sweep_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "gradsweep", "-m", *SWEEP, *extra, f"hydra.sweep.dir={sweep_dir}"]


def _groups_done(sweep_dir: Path) -> int:
    return len(list((sweep_dir / GROUPS_DIR).glob(f"*/{RUNS_FILE}")))


def _tables(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs, steps = load_sweep(sweep_dir)
    runs = runs.drop(columns=VARIES).sort_values("run_id").reset_index(drop=True)
    steps = steps.sort_values(["run_id", "step", "layer"]).reset_index(drop=True)
    return runs, steps


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume") / "whole"
    subprocess.run(_cmd(d, "quiet=true"), check=True, capture_output=True, timeout=scaled(300))
    return _tables(d)


# Where the sweep is killed, in the order one sweep meets them (each start resumes the one killed before it):
# before any group is complete; while training a group (half its steps done, the groups before it complete and
# its tables not yet written); or once some groups are complete, before the next one trains.
KILL_POINTS = [("after", 0), ("training", 1), ("after", 2), ("training", 4), ("after", 5)]


@pytest.mark.slow
def test_sigkill_then_rerun_gives_every_run_once(tmp_path, uninterrupted):
    """One sweep killed at each point in turn, every start resuming the last: then run to the end, its tables
    equal the uninterrupted sweep's, every run once. (Five points in one chain, not five sweeps each killed once:
    the same resume path, a third of the processes.)"""
    d = tmp_path / "killed"
    for i, (kind, k) in enumerate(KILL_POINTS):
        before = _groups_done(d) if d.exists() else 0
        # The group this start trains that is held: the (k+1)-th of the sweep before it trains, or the k-th halfway.
        group, step = (k + 1 - before, 0) if kind == "after" else (k - before, STEPS // 2)
        cmd, env, marker = held(tmp_path, "gradsweep", _cmd(d)[3:], group, step)
        log = tmp_path / f"out{i}.txt"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
            wait(marker.exists, proc)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        text = log.read_text()
        assert marker.exists(), f"the sweep did not reach its hold ({kind} {k}): {text[-2000:]}"
        done = _groups_done(d)
        assert done == (k if kind == "after" else k - 1), f"killed after {done} groups ({kind} {k})"
        if before:
            assert f"{4 * before} of 24 runs already complete" in text, text[-2000:]
    rerun = subprocess.run(_cmd(d, "quiet=true"), capture_output=True, text=True, timeout=scaled(300))
    assert rerun.returncode == 0, rerun.stderr
    assert f"{4 * done} of 24 runs already complete" in rerun.stderr + rerun.stdout
    assert not list(d.rglob(".*.tmp-*"))
    runs, steps = _tables(d)
    want_runs, want_steps = uninterrupted
    assert runs["run_id"].is_unique and len(runs) == 24
    pd.testing.assert_frame_equal(runs, want_runs)
    pd.testing.assert_frame_equal(steps, want_steps)


def test_a_changed_config_under_the_same_directory_is_refused(tmp_path):
    d = tmp_path / "s"
    small = [sys.executable, "-m", "gradsweep", "-m", "model.depth=2", "optim.lr=0.01,0.02", "train.steps=5", "quiet=true",
             f"hydra.sweep.dir={d}"]
    subprocess.run(small, check=True, capture_output=True, timeout=scaled(120))
    before = {p: p.stat().st_mtime_ns for p in d.rglob("*.parquet")}
    changed = [a.replace("optim.lr=0.01,0.02", "optim.lr=0.01,0.03") for a in small]
    r = subprocess.run(changed, capture_output=True, text=True, timeout=scaled(120))
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("gradsweep: error:")]
    assert len(err) == 1 and "holds a run of another configuration" in err[0]
    assert {p: p.stat().st_mtime_ns for p in d.rglob("*.parquet")} == before


def test_interrupted_groups_and_temporaries_are_cleaned(tmp_path):
    d = tmp_path / "s"
    subprocess.run([sys.executable, "-m", "gradsweep", "-m", "optim.lr=0.01,0.02", "train.steps=5", "quiet=true",
                    f"hydra.sweep.dir={d}"], check=True, capture_output=True, timeout=scaled(120))
    (d / GROUPS_DIR / "9").mkdir()
    (d / GROUPS_DIR / "9" / "steps.parquet").write_bytes(b"torn")  # steps written, runs never: interrupted
    (d / "0" / ".hydra" / ".config.yaml.tmp-123").write_text("half")
    done = completed_runs(d)
    assert sorted(done) == ["0", "1"] and not (d / GROUPS_DIR / "9").exists()
    assert not list(d.rglob(".*.tmp-*"))


def test_groups_a_running_job_still_writes_are_left_alone(tmp_path):
    d = tmp_path / "s"
    subprocess.run([sys.executable, "-m", "gradsweep", "-m", "optim.lr=0.01,0.02", "train.steps=5", "quiet=true",
                    f"hydra.sweep.dir={d}"], check=True, capture_output=True, timeout=scaled(120))
    for g in ("8", "9"):  # two groups half-written: 8 by a dead start, 9 by a job that still runs on a cluster
        (d / GROUPS_DIR / g).mkdir()
        (d / GROUPS_DIR / g / ".steps.parquet.tmp-77.parquet").write_bytes(b"half")
    (d / "5" / ".hydra").mkdir(parents=True)
    (d / "5" / ".hydra" / ".config.yaml.tmp-77.yaml").write_text("half")  # job 5 is in group 9
    done = completed_runs(d, busy=frozenset({d / GROUPS_DIR / "9", d / "5"}))
    assert sorted(done) == ["0", "1"] and not (d / GROUPS_DIR / "8").exists()
    left = sorted(p.relative_to(d).as_posix() for p in d.rglob(".*.tmp-*"))
    assert left == ["5/.hydra/.config.yaml.tmp-77.yaml", "groups/9/.steps.parquet.tmp-77.parquet"]
