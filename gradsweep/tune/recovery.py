"""Workers that die: a trial a killed worker left RUNNING is failed and queued again, once its worker is known
gone (its process, on this machine) or silent (no heartbeat for ``tune.stale_after_s``)."""

from __future__ import annotations

import copy
import logging
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from gradsweep.errors import first_line
from gradsweep.results.schema import TRIALS_DIR
from gradsweep.results.store import discard_incomplete
from gradsweep.sweep.submit import process_alive
from gradsweep.tune.study import (
    BEAT_ATTR,
    FAILED_ATTR,
    GROUP_ATTR,
    WORKER_ATTR,
    fail_running,
    set_system_attr,
    stored_trial,
)

log = logging.getLogger("gradsweep.tune")

MAX_RETRY = 3  # a trial whose worker died is queued again at most this many times


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def stale_reason(trial: Any, now: float, stale_after_s: float) -> str | None:
    """Why a RUNNING trial's worker is gone, or None while it may still be training it.

    Gone: its worker ran on this machine and its process is dead, or no heartbeat (a system attribute each
    worker refreshes every ``stale_after_s / 4`` while it trains) for ``stale_after_s`` seconds.
    """
    worker = trial.system_attrs.get(WORKER_ATTR)
    beat = trial.system_attrs.get(BEAT_ATTR)
    if beat is None and trial.datetime_start is not None:
        beat = trial.datetime_start.timestamp()
    if worker:
        host, _, pid = str(worker).rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
            return f"its worker {worker} is gone"
    if beat is not None and now - float(beat) > stale_after_s:
        return f"no heartbeat from {worker or 'its worker'} for {now - float(beat):.0f} s"
    return None


def fail_and_requeue(study: Any, trial: Any, tdir: Path, why: str) -> bool:
    """Mark a trial FAIL (unless another worker got there first), remove what it left half-written, and queue
    a retry with the same parameters (Optuna's RetryHeartbeatStaleTrialCallback). True if this call failed it."""
    import optuna

    try:
        set_system_attr(study, trial, FAILED_ATTR, why)
        if not fail_running(study, trial):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    frozen = stored_trial(study, trial)
    group = frozen.system_attrs.get(GROUP_ATTR)
    if group is not None:  # its group, if that never completed, with its job directory and any temporaries
        discard_incomplete(tdir, groups=[str(group)], run_dirs=[tdir / TRIALS_DIR / str(frozen.number)])
    with warnings.catch_warnings():  # experimental since Optuna 2.8, and the way Optuna itself retries trials
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback",
                        getattr(optuna.storages, "RetryFailedTrialCallback", None))(max_retry=MAX_RETRY)
    n_before = len(study.get_trials(deepcopy=False))
    frozen.system_attrs.pop(FAILED_ATTR, None)
    retry(study, _without_worker(frozen))
    queued = len(study.get_trials(deepcopy=False)) > n_before
    log.warning(f"trial {frozen.number} was left RUNNING ({why}): marked FAIL"
                + (", queued again with the same parameters" if queued else f", not queued again ({MAX_RETRY} retries)"))
    return True


def _without_worker(trial: Any) -> Any:
    t = copy.deepcopy(trial)
    for key in (WORKER_ATTR, BEAT_ATTR, GROUP_ATTR):
        t.system_attrs.pop(key, None)
    return t


def recover_stale(study: Any, tdir: Path, stale_after_s: float) -> list[int]:
    """Fail and queue again every RUNNING trial whose worker is gone; the numbers of those this call failed."""
    import optuna

    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        why = stale_reason(t, now, stale_after_s)
        if why is not None and fail_and_requeue(study, t, tdir, why):
            failed.append(t.number)
    return failed


class Heartbeat:
    """Refresh ``BEAT_ATTR`` of the trials this worker trains, every ``every`` seconds, from a thread."""

    def __init__(self, study: Any, trials: list[Any], every: float) -> None:
        self.study, self.trials, self.every = study, trials, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gradsweep-heartbeat", daemon=True)

    def beat(self) -> None:
        import optuna

        now = time.time()
        for t in self.trials:
            try:
                set_system_attr(self.study, t, BEAT_ATTR, now)
            except optuna.exceptions.UpdateFinishedTrialError:
                pass  # failed as stale by another worker meanwhile; its retry will read what this one writes

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.beat()
            except Exception as e:  # storage briefly unreachable: try again at the next beat
                log.warning(f"heartbeat not recorded: {first_line(e)}")

    def __enter__(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
