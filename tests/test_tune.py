"""gradsweep.tune: a real Optuna study on real storage (journal file, SQLite, PostgreSQL), trials trained fused."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from conftest import scaled
from holding import held, wait
from optuna.trial import TrialState
from reference import RefMLP, article_data, article_linears, reference_training
from torch import nn

from gradsweep import load_sweep
from gradsweep.config.sections import ConfigError
from gradsweep.tune import compose, tune_study
from gradsweep.tune.study import CONSTRAINTS

ROOT = Path(__file__).resolve().parent.parent
FAST = ["model.depth=4", "init=kaiming", "train.steps=40", "quiet=true"]


def _tune(out: Path, *overrides: str) -> dict:
    values, base, tune = compose([*FAST, f"tune.out_dir={out}", *overrides])
    return tune_study(values, base, tune, quiet=True)


def _cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradsweep.tune", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=scaled(300))


def _journal(out: Path) -> Path:
    return out / "tune" / "study.journal"


def test_resume_adds_trials_to_the_same_study(tmp_path):
    first = _tune(tmp_path, "tune.n_trials=5", "tune.batch_size=2")
    second = _tune(tmp_path, "tune.n_trials=3", "tune.batch_size=3")
    assert first["study_name"] == second["study_name"] and second["trials"] == 8
    study = optuna.load_study(study_name=second["study_name"], storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(_journal(tmp_path)))))  # what optuna-dashboard opens
    assert sorted(t.number for t in study.trials) == list(range(8))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    # Every trial wrote its run tables like any gradsweep run; load_sweep reads the tune directory.
    runs, steps = load_sweep(tmp_path / "tune")
    assert sorted(runs["job_num"].astype(int)) == list(range(8))
    assert set(runs["run_id"]) == {t.user_attrs["run_id"] for t in study.trials}
    lrs = {t.user_attrs["run_id"]: t.params["lr"] for t in study.trials}
    assert all(math.isclose(r["optim.lr"], lrs[r["run_id"]], rel_tol=1e-12) for _, r in runs.iterrows())
    assert set(steps["run_id"]) == set(runs["run_id"])
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    assert best["trials"] == 8 and (tmp_path / "tune" / "stability.png").stat().st_size > 10_000


def test_constraints_mark_diverging_trials_infeasible_and_keep_them(tmp_path):
    # lr in [0.5, 50] on the article's data diverges; [1e-4, 1e-3] trains slowly but stably.
    hot = _tune(tmp_path / "hot", "tune.n_trials=4", "tune.batch_size=4", "tune.lr_min=0.5", "tune.lr_max=50")
    assert hot["trials"] == 4 and hot["feasible"] == 0 and hot["diverged"] == 4 and hot["best"] is None
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(_journal(tmp_path / "hot"))))
    for t in optuna.load_study(study_name=hot["study_name"], storage=storage).trials:
        assert t.state == optuna.trial.TrialState.COMPLETE and t.value == math.inf
        assert t.user_attrs["feasible"] is False and t.user_attrs["diverged"] is True
        assert t.constraints["diverged"] > 0 and set(t.constraints) == set(CONSTRAINTS)
    cool = _tune(tmp_path / "cool", "tune.n_trials=3", "tune.lr_min=1e-4", "tune.lr_max=1e-3")
    assert cool["feasible"] == 3 and cool["best"] is not None
    assert cool["edge"]["largest_stable_lr"] is not None and cool["edge"]["smallest_unstable_lr_above"] is None


def test_vanishing_init_is_infeasible_whatever_the_lr(tmp_path):
    # Depth 12 with std-0.01 weights: the first layer gets ~nothing at init, a constraint on the configured bounds.
    s = _tune(tmp_path, "tune.n_trials=2", "model.depth=12", "init=normal", "init.std=0.01")
    assert s["feasible"] == 0 and s["diverged"] == 0


@pytest.mark.parametrize(("override", "words"), [
    ("tune.lr_min=1.0", "tune.lr_max=10.0 is not valid"),  # lr_max must exceed lr_min: 1 < 10 fine, so swap below
    ("tune.n_trials=0", "tune.n_trials=0 is not valid"),
    ("tune.sampler=annealing", "tune.sampler='annealing' is not valid; valid values: tpe, random"),
    ("tune.storage=postgresql+psycopg://nobody:secret@127.0.0.1:9/none", "is not reachable"),
    ("tune.search={model.depth: {low: 1, high: 3}}", "tune.search key 'model.depth' is not valid"),
    ("tune.objective=speed", "tune.objective='speed' is not valid"),
    ("tune.batch_size=-2", "tune.batch_size=-2 is not valid"),
    ("tune.bogus=1", "tune.bogus is not a known key"),
    ("optim.lr=0.1,0.2", "is a sweep"),
    ("model.depth=0", "model.depth=0 is not valid"),
])
@pytest.mark.slow  # each case a command in a subprocess
def test_bad_input_one_line_exit_2_study_untouched(tmp_path, override, words):
    if override == "tune.lr_min=1.0":
        override, words = "tune.lr_min=10", "tune.lr_min=10.0 is not valid; it must be a number < tune.lr_max (10)"
    _tune(tmp_path, "tune.n_trials=2")
    before = _journal(tmp_path).read_bytes()
    files_before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    r = _cli(*FAST, f"tune.out_dir={tmp_path}", override)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("gradsweep.tune: error: ") and words in lines[0], r.stderr
    assert "secret" not in r.stderr
    assert _journal(tmp_path).read_bytes() == before
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == files_before


def test_a_study_of_another_configuration_is_refused(tmp_path):
    _tune(tmp_path, "tune.n_trials=1", "tune.study_name=shared")
    with pytest.raises(ConfigError, match="created for another configuration"):
        _tune(tmp_path, "tune.n_trials=1", "tune.study_name=shared", "model.width=12")


def test_extra_search_dimension_reaches_the_runs(tmp_path):
    s = _tune(tmp_path, "tune.n_trials=4", "tune.search={train.clip_norm: {low: 0.1, high: 10, log: true}}")
    runs, _ = load_sweep(tmp_path / "tune")
    assert runs["train.clip_norm"].between(0.1, 10).all() and runs["train.clip_norm"].nunique() == 4
    assert s["trials"] == 4


def _two_workers(tmp_path: Path, storage: str | None, n: tuple[int, int] = (6, 5)) -> None:
    out = tmp_path / "shared"
    args = [*FAST, f"tune.out_dir={out}", "tune.study_name=concurrent", "tune.batch_size=2"]
    if storage:
        args.append(f"tune.storage={storage}")
    procs = [subprocess.Popen([sys.executable, "-m", "gradsweep.tune", *args, f"tune.n_trials={k}", f"tune.seed={i}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, k in enumerate(n)]
    for p in procs:
        _, err = p.communicate(timeout=scaled(300))
        assert p.returncode == 0, err
    st = storage or optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(_journal(out))))
    trials = optuna.load_study(study_name="concurrent", storage=st).trials
    assert len(trials) == sum(n) and sorted(t.number for t in trials) == list(range(sum(n)))
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
    runs, _ = load_sweep(out / "tune")
    assert sorted(runs["job_num"].astype(int)) == list(range(sum(n)))  # each trial's run written once


@pytest.mark.slow
def test_two_concurrent_workers_on_the_default_store(tmp_path):
    _two_workers(tmp_path, None)


@pytest.fixture(scope="module")
def postgres_url():
    """A real PostgreSQL server: GRADSWEEP_PG_URL (.ci/run starts one), else a throwaway one started here."""
    if os.environ.get("GRADSWEEP_PG_URL"):
        yield os.environ["GRADSWEEP_PG_URL"]
        return
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        pytest.skip("no PostgreSQL server here (apt-get install postgresql; .ci/run does)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = tempfile.mkdtemp(prefix="gradsweep-pg-")
    script = ROOT / "scripts" / "pg_test_server.sh"
    url = subprocess.run(["bash", str(script), d, str(port)], check=True, capture_output=True, text=True).stdout.strip()
    yield url
    subprocess.run(["bash", str(script), "--stop", d], check=False, capture_output=True)
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_two_concurrent_workers_on_postgresql(tmp_path, postgres_url):
    import sqlalchemy

    engine = sqlalchemy.create_engine(postgres_url)
    with engine.begin() as c:  # a fresh schema per run of this test
        c.execute(sqlalchemy.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    _two_workers(tmp_path, postgres_url)


def test_sqlite_url_storage(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    s = _tune(tmp_path, "tune.n_trials=3", f"tune.storage={url}")
    assert len(optuna.load_study(study_name=s["study_name"], storage=url).trials) == 3


@pytest.mark.slow
def test_acceptance_best_lr_trains_stably_in_plain_pytorch(tmp_path):
    r = _cli("model.depth=10", "init=kaiming", "tune.n_trials=64", f"tune.out_dir={tmp_path}", "quiet=true")
    assert r.returncode == 0, r.stderr
    assert "best stable lr = " in r.stdout and "stability edge: stable from lr " in r.stdout
    best = json.loads((tmp_path / "tune" / "best.json").read_text())
    assert best["trials"] == 64 and best["best"] is not None and "stable band" in best["edge_definition"]
    lr = best["best"]["lr"]
    # The edge agrees with the study's own trials: stable means healthy over the whole run, so no stable trial ended
    # at the loss of predicting the mean (the trial 0 did, at lr 0.055), and no unstable trial lies inside
    # the stable band; the first unstable lr above the best is the smallest unstable one there.
    trials = pd.read_csv(tmp_path / "tune" / "trials.csv")
    done = trials[trials.state == "COMPLETE"]
    stable, unstable = done[done.feasible], done[~done.feasible]
    assert (stable.verdict == "healthy").all() and (stable.final_loss < 0.99 * stable.baseline_loss).all()
    edge = best["edge"]
    assert not ((unstable.lr >= edge["smallest_stable_lr"]) & (unstable.lr <= edge["largest_stable_lr"])).any()
    assert edge["smallest_unstable_lr_above"] == unstable[unstable.lr > lr].lr.min()
    assert edge["smallest_stable_lr"] <= lr <= edge["largest_stable_lr"] < edge["smallest_unstable_lr_above"]
    assert not (unstable.lr < edge["smallest_stable_lr"]).any()  # on this study: nothing unstable below the band
    # Rerun unfused: the article's nn.Linear layers, torch.optim.SGD, float32, 500 steps, on the article's data.
    x, y = article_data()
    model = RefMLP(article_linears(0, 10, 10, nn.init.kaiming_uniform_), "relu")
    loss = reference_training(model, x, y, 500, lr=lr)["loss"]
    assert np.isfinite(loss).all() and loss[-1] < loss[0]
    final = nn.functional.mse_loss(model(x), y).item()  # (RefMLP keeps its tensors' grads: no no_grad here)
    # Stable: finite, below the initial loss, and the fused trial's own final loss (float32 both, 5%).
    assert math.isfinite(final) and final < loss[0]
    assert math.isclose(final, best["best"]["loss"], rel_tol=0.05)
    assert final < 0.5 * best["best"]["baseline_loss"]  # it learned: well below predicting the mean


def test_report_of_a_sweep_embeds_its_search_and_keeps_trials_apart(tmp_path):
    from sweeps import grid, write_sweep

    from gradsweep.report.build import make_report
    from gradsweep.results.store import load_runs

    sweep = write_sweep(tmp_path / "sweep", grid(**{"model.depth": [2, 3], "init": ["xavier", "kaiming"]}))
    _tune(sweep, "tune.n_trials=3")  # tune.out_dir=<sweep>: the search sits in the sweep's directory
    assert len(load_runs(sweep)) == 4 and len(load_runs(sweep / "tune")) == 3
    index = make_report(sweep, quiet=True)
    page = index.read_text()
    assert "Learning-rate search" in page and (index.parent / "tune_stability.png").is_file()


def test_the_report_of_a_searchs_own_folder_reads_its_tune_dir(tmp_path):
    from gradsweep.report.build import make_report

    _tune(tmp_path / "out", "tune.n_trials=2")
    index = make_report(tmp_path / "out", quiet=True)  # the folder the user named as tune.out_dir
    assert index == tmp_path / "out" / "tune" / "report" / "index.html"
    assert "2 runs:" in (index.parent / "summary.txt").read_text()


# ---------------------------------------------------------------------------------------------------------
# A worker that dies: its trials are failed, queued again with the same parameters, and nothing is lost


KILL_STEPS = 200
KILL_CMD = ["model.depth=2", f"train.steps={KILL_STEPS}", "tune.n_trials=8", "tune.batch_size=4", "tune.sampler=random"]


def _study(out: Path) -> optuna.Study:
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(_journal(out))))
    return optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage)


def _trials_and_tables_agree(out: Path, study: optuna.Study) -> None:
    from gradsweep.results.schema import GROUPS_DIR, RUNS_FILE

    states = {t.number: t.state for t in study.trials}
    assert not [n for n, s in states.items() if s in (TrialState.RUNNING, TrialState.WAITING)], states
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    runs, _ = load_sweep(out / "tune")  # every complete trial's run, once, and nothing else
    assert runs["run_id"].is_unique
    assert set(runs["run_id"]) == {t.user_attrs["run_id"] for t in complete}
    assert not list(out.rglob(".*.tmp-*"))
    assert all((g / RUNS_FILE).is_file() for g in (out / "tune" / GROUPS_DIR).iterdir())
    for t in study.trials:  # a failed trial has a completed retry with the same parameters
        if t.state == TrialState.FAIL:
            retries = [r for r in complete if r.system_attrs.get("failed_trial") == t.number]
            assert len(retries) == 1 and retries[0].params == t.params, t.number


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_a_worker_killed_while_training_loses_no_trial(tmp_path, sig):
    cmd = [sys.executable, "-m", "gradsweep.tune", *KILL_CMD, f"tune.out_dir={tmp_path}"]
    # Held halfway through its second batch's training (the second group it trains), then signalled.
    held_cmd, env, marker = held(tmp_path, "gradsweep.tune", cmd[3:], 2, KILL_STEPS // 2)
    # Ctrl-C's default action in the child as in a terminal's foreground job, even where this test runs in a
    # background job of a non-interactive shell (which starts it, and so its children, with SIGINT ignored).
    proc = subprocess.Popen(held_cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait(marker.exists, proc)
    try:
        assert proc.poll() is None and marker.exists(), "the tuner did not reach its second batch's training"
        proc.send_signal(sig)
        text = proc.communicate(timeout=scaled(60))[1].decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == signal.SIGINT:  # Ctrl-C: one line, the conventional exit status
        assert proc.returncode == 130 and text.rstrip().splitlines()[-1].startswith("gradsweep.tune: interrupted;")
    study = _study(tmp_path)
    by_state = {s: sorted(t.number for t in study.trials if t.state == s) for s in TrialState}
    assert by_state[TrialState.COMPLETE] == [0, 1, 2, 3], by_state
    if sig == signal.SIGKILL:  # left RUNNING by the dead worker: the next start fails and queues them
        assert by_state[TrialState.RUNNING] == [4, 5, 6, 7], by_state
    else:  # interrupted: failed and queued again on the way out
        assert by_state[TrialState.FAIL] == [4, 5, 6, 7] and by_state[TrialState.WAITING] == [8, 9, 10, 11], by_state

    rerun = subprocess.run([*cmd, "quiet=true"], cwd=ROOT, capture_output=True, text=True, timeout=scaled(300))
    assert rerun.returncode == 0, rerun.stderr
    if sig == signal.SIGKILL:
        assert rerun.stderr.count("was left RUNNING (its worker") == 4, rerun.stderr
    study = _study(tmp_path)
    assert sorted(t.number for t in study.trials if t.state == TrialState.FAIL) == [4, 5, 6, 7]
    assert len([t for t in study.trials if t.state == TrialState.COMPLETE]) == 4 + 8
    _trials_and_tables_agree(tmp_path, study)
    assert json.loads((tmp_path / "tune" / "best.json").read_text())["complete"] == 12


@pytest.mark.slow  # processes
def test_stale_trials_are_retried_and_live_ones_left_alone(tmp_path):
    """Trials left RUNNING as a dead worker leaves them: one by a dead process on this machine (whose
    configuration already has complete tables: read, not trained again), one by another machine that stopped
    beating; a third, beating on another machine, is still being trained there and must be left alone."""
    from gradsweep.results.schema import GROUPS_DIR
    from gradsweep.tune.study import BEAT_ATTR, WORKER_ATTR

    _tune(tmp_path, "tune.n_trials=4", "tune.batch_size=4", "tune.sampler=random", "tune.prior=none")
    study = _study(tmp_path)
    done = study.trials[2]
    dead = subprocess.Popen(["true"])
    dead.wait()
    storage, host = study._storage, socket.gethostname()
    left = []
    for lr, worker, beat in [(done.params["lr"], f"{host}:{dead.pid}", time.time()),
                             (0.00123, "elsewhere:1", time.time() - 1000), (0.00456, "elsewhere:2", time.time())]:
        study.enqueue_trial({"lr": lr})
        t = study.ask()
        t.suggest_float("lr", 1e-4, 10.0, log=True)
        storage.set_trial_system_attr(t._trial_id, WORKER_ATTR, worker)
        storage.set_trial_system_attr(t._trial_id, BEAT_ATTR, beat)
        left.append(t.number)
    groups_before = sorted(p.name for p in (tmp_path / "tune" / GROUPS_DIR).iterdir())

    _tune(tmp_path, "tune.n_trials=2", "tune.batch_size=2", "tune.sampler=random", "tune.prior=none")
    study = _study(tmp_path)
    t = {x.number: x for x in study.trials}
    assert t[left[0]].state == TrialState.FAIL and "is gone" in t[left[0]].system_attrs["gradsweep_failed"]
    assert t[left[1]].state == TrialState.FAIL and "no heartbeat" in t[left[1]].system_attrs["gradsweep_failed"]
    assert t[left[2]].state == TrialState.RUNNING  # alive elsewhere
    retry_dead, retry_quiet = (next(x for x in study.trials if x.system_attrs.get("failed_trial") == n) for n in left[:2])
    assert retry_dead.state == retry_quiet.state == TrialState.COMPLETE
    assert retry_dead.params == done.params and retry_dead.value == done.value  # read from trial 2's tables
    assert retry_dead.user_attrs["run_id"] == done.user_attrs["run_id"]
    groups_after = sorted(p.name for p in (tmp_path / "tune" / GROUPS_DIR).iterdir())
    assert groups_after == sorted([*groups_before, str(retry_quiet.number)])  # only the other one was trained
    runs, _ = load_sweep(tmp_path / "tune")
    assert runs["run_id"].is_unique and len(runs) == 5


def test_stable_band_is_the_widest_run_of_stable_lrs_and_its_best_keeps_off_the_edge():
    from gradsweep.tune import best_of_study
    from gradsweep.tune.config import TuneCfg

    lrs = [1e-4, 2e-4, 4e-4, 8e-4, 1e-3, 1.6e-3, 3e-3, 5e-3, 1e-2, 2e-2]
    ok = [False, True, True, True, True, False, True, False, False, False]  # 1e-4 stalled; 3e-3 an island
    loss = [9.8, 3.0, 2.0, 1.5, 1.2, 9.76, 0.4, 9.76, math.inf, math.inf]
    study = optuna.create_study(study_name="s", direction="minimize")  # a real (in-memory) study
    dist = {"lr": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)}
    for lr, feasible, value in zip(lrs, ok, loss):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr}, distributions=dist, value=value,
            user_attrs={"feasible": feasible, "diverged": value == math.inf, "final_loss": value, "baseline_loss": 9.76,
                        "run_id": f"r{lr}", "verdict": "healthy" if feasible else "stalled"}))
    s = best_of_study(study, TuneCfg(), "memory", Path("out"))
    assert s["edge"] == {"smallest_stable_lr": 2e-4, "largest_stable_lr": 1e-3, "smallest_unstable_lr_above": 1.6e-3,
                         "largest_unstable_lr_below": 1e-4, "band_trials": 4}
    # The lowest loss at least 2x below the first unstable lr above (1.6e-3): 8e-4, not 1e-3 at the edge nor the island.
    assert s["best"]["lr"] == 8e-4 and s["isolated_better_trial"]["lr"] == 3e-3


def test_the_printed_line_counts_every_trial_by_what_made_it_unstable():
    from gradsweep.tune import best_of_study
    from gradsweep.tune.config import TuneCfg
    from gradsweep.tune.results import describe

    study = optuna.create_study(study_name="s", direction="minimize")
    dist = {"lr": optuna.distributions.FloatDistribution(1e-5, 1.0, log=True)}
    trials = [("healthy", True), ("healthy", True), ("diverged", False), ("dead", False), ("dead", False),
              ("stalled", False), ("healthy", False)]  # the last: healthy, but its loss rose
    for k, (verdict, feasible) in enumerate(trials):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": 10.0 ** (-4 + k / 2)}, distributions=dist, value=1.0 + k,
            user_attrs={"feasible": feasible, "diverged": verdict == "diverged", "final_loss": 1.0, "run_id": f"r{k}",
                        "baseline_loss": 9.76, "verdict": verdict}))
    study.add_trial(optuna.trial.create_trial(params={"lr": 0.5}, distributions=dist, state=optuna.trial.TrialState.FAIL))
    s = best_of_study(study, TuneCfg(), "memory", Path("out"))
    assert s["counts"] == {"stable": 2, "diverged": 1, "dead": 2, "stalled": 1, "loss rose": 1, "fail": 1}
    assert sum(s["counts"].values()) == s["trials"] == 8
    assert describe(s).splitlines()[0] == ("study s (memory): 8 trials, 2 stable, 1 stalled, 2 dead, 1 diverged, "
                                           "1 loss rose, 1 fail")


def test_concurrent_workers_never_share_a_sampler_seed():
    """Workers started together with tune.seed 0 and 1 find 0 or 1 trials before them: no two get the same seed
    (seed + trials did: 0 + 1 == 1 + 0, and their random start proposed the same learning rates)."""
    from gradsweep.tune.study import sampler_seed

    seeds = {(s, n): sampler_seed(s, n) for s in range(4) for n in range(50)}
    assert len(set(seeds.values())) == len(seeds)
    assert sampler_seed(7, 0) == 7  # a new study is seeded with tune.seed itself


def test_trials_record_their_edge_and_phase_and_the_prior_sets_the_range(tmp_path):
    """tune.prior=curvature (the default for SGD): lambda_0 measured once before the first batch, the lr searched in
    0.1x .. 20x the edge it predicts; every trial's lr_over_edge and phase in trials.csv; best.json and the printed
    lines hold the predicted edge beside the measured one."""
    from gradsweep.engine.train import initial_sharpness
    from gradsweep.tune.config import PRIOR_PROBES
    from gradsweep.tune.results import describe

    s = _tune(tmp_path, "tune.n_trials=8", "tune.batch_size=8")
    prior = s["curvature"]
    values, base, _ = compose([*FAST, f"tune.out_dir={tmp_path}"])
    lam0 = float(initial_sharpness([base]).value[0])
    assert prior["prior"] == "curvature" and math.isclose(prior["sharpness_init"], lam0, rel_tol=1e-6)
    assert math.isclose(prior["lr_edge_pred"], 2 / lam0, rel_tol=1e-6)
    assert math.isclose(prior["lr_min"], 0.2 / lam0, rel_tol=1e-6) and math.isclose(prior["lr_max"], 40 / lam0,
                                                                                   rel_tol=1e-6)
    trials = pd.read_csv(tmp_path / "tune" / "trials.csv").sort_values("number")
    assert trials["lr"].between(prior["lr_min"], prior["lr_max"]).all()
    # a new study starts from a bracket of the predicted edge, then the sampler's own picks
    np.testing.assert_allclose(trials["lr"].iloc[:6], np.array(PRIOR_PROBES) * 2 / lam0, rtol=1e-6)
    assert all(t.state.name == "COMPLETE" for t in _study(tmp_path).trials)  # no probe left waiting
    assert np.allclose(trials["sharpness_init"], lam0, rtol=1e-6)  # each trial measured it too: the same
    assert np.allclose(trials["lr_over_edge"], trials["lr"] / trials["lr_edge_pred"], rtol=1e-9)
    assert set(trials["phase"]) <= {"monotone", "catapult", "diverged"}
    assert (trials.loc[trials["diverged"], "phase"] == "diverged").all()
    text = describe(s)
    assert f"predicted edge 2 / lambda_0 = {2 / lam0:.4g}" in text


def test_a_given_range_or_prior_none_or_adam_searches_the_given_range(tmp_path):
    s = _tune(tmp_path / "given", "tune.n_trials=2", "tune.lr_min=1e-4", "tune.lr_max=1e-3")
    assert s["curvature"]["prior"] == "none" and s["curvature"]["why"] == "tune.lr_min / tune.lr_max given"
    assert s["curvature"]["lr_edge_pred"] > 0  # still measured and reported
    trials = pd.read_csv(tmp_path / "given" / "tune" / "trials.csv")
    assert trials["lr"].between(1e-4, 1e-3).all()
    s = _tune(tmp_path / "none", "tune.n_trials=2", "tune.prior=none")
    assert s["curvature"] == {"prior": "none", "why": "tune.prior=none"}
    assert pd.read_csv(tmp_path / "none" / "tune" / "trials.csv")["lr"].between(1e-4, 10).all()
    s = _tune(tmp_path / "adam", "tune.n_trials=2", "optim=adam")
    assert s["curvature"]["prior"] == "none" and s["curvature"]["why"].startswith("adam: no prediction")
    trials = pd.read_csv(tmp_path / "adam" / "tune" / "trials.csv")
    assert trials["lr_over_edge"].isna().all() and trials["lr"].between(1e-4, 10).all()
