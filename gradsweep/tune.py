"""``python -m gradsweep.tune [overrides]``: search a stable learning rate with Optuna, trials trained in fused batches.

The configuration is the runner's (``gradsweep/conf/``, the same overrides: ``model.depth=30 init=kaiming``...) plus the
``tune`` group (``gradsweep/conf/tune/default.yaml``). ``tune.batch_size`` trials are asked at once and trained as one
stacked group; each is told its objective (the loss after training, or the mean logged loss) and its
stability constraints (Optuna's ``Trial.set_constraint``, named as below; on Optuna 4 the samplers that take a
``constraints_func`` get them through it):

- ``diverged``: the run did not diverge (no NaN/Inf in its loss or gradients),
- ``dead``: some signal reaches the first layer at the end of training,
- ``vanishing`` / ``exploding``: its gradient ratio lies within ``verdict.vanish_below`` .. ``verdict.explode_above``
  at initialisation and as its median over training,
- ``stalled``: its final loss is below ``(1 - verdict.stall_margin)`` times the data's baseline loss (the loss of
  predicting the mean, or the class prior),
- ``loss_increased``: its final loss is not above its initial loss.

A trial is stable (feasible) exactly when its run's verdict is ``healthy`` and its loss fell.

Infeasible trials are kept and marked (user attributes ``feasible`` and ``constraints``). The study lives in an
Optuna journal file under the output directory by default (or any SQLAlchemy URL, e.g. PostgreSQL) and a
rerun of the same command continues it. Outputs, under ``<out_dir>/tune/``: ``best.json`` (the best stable
learning rate, its loss, the stability edge), ``stability.png``, ``trials.csv``, and every trial's run tables
(``groups/``, ``trials/<number>/``), which ``load_sweep`` and the report read like any sweep.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from gradsweep.config import (
    SECTIONS,
    ConfigError,
    RunCfg,
    _check,
    _choice,
    _coerce,
    _hints,
    build_run_cfg,
    config_hash,
    first_line,
)
from gradsweep.tables import TUNE_DIR

log = logging.getLogger("gradsweep.tune")

SAMPLERS = ("tpe", "random", "qmc", "gp", "nsgaii", "cmaes")
OBJECTIVES = ("final_loss", "loss_auc")
SEARCHABLE_SECTIONS = ("optim", "train", "init")  # float fields of these may be extra search dimensions
JOURNAL_FILE = "study.journal"
TABLE_CREATION_TRIES = 5
BASE_ATTR = "gradsweep_base"  # study user attribute: hash of the configuration the study was created for
# Trial system attributes: which process trains it, when it last said so, and the group directory its tables go to.
WORKER_ATTR, BEAT_ATTR, GROUP_ATTR = "gradsweep_worker", "gradsweep_heartbeat", "gradsweep_group"
MAX_RETRY = 3  # a trial whose worker died is queued again at most this many times


@dataclass
class SearchDim:
    """One extra search dimension: a float config key searched in [low, high]."""

    key: str
    low: float
    high: float
    log: bool = False


@dataclass
class TuneCfg:
    """The ``tune`` group; see ``gradsweep/conf/tune/default.yaml``."""

    n_trials: int = 64
    batch_size: int = 16
    lr_min: float = 1e-4
    lr_max: float = 10.0
    search: list[SearchDim] = field(default_factory=list)
    sampler: str = "tpe"
    seed: int = 0
    objective: str = "final_loss"
    study_name: str | None = None
    storage: str | None = None
    out_dir: str | None = None
    stale_after_s: float = 120.0
    safety: float = 2.0

    def __post_init__(self) -> None:
        _check("tune.n_trials", self.n_trials, self.n_trials >= 1, "an integer >= 1")
        _check("tune.batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1")
        _check("tune.lr_min", self.lr_min, 0 < self.lr_min and math.isfinite(self.lr_min), "a number > 0")
        _check("tune.lr_max", self.lr_max, self.lr_min < self.lr_max and math.isfinite(self.lr_max),
               f"a number > tune.lr_min ({self.lr_min:g})")
        _choice("tune.sampler", self.sampler, SAMPLERS)
        _choice("tune.objective", self.objective, OBJECTIVES)
        _check("tune.stale_after_s", self.stale_after_s, self.stale_after_s > 0 and math.isfinite(self.stale_after_s),
               "a number of seconds > 0")
        _check("tune.safety", self.safety, self.safety >= 1 and math.isfinite(self.safety), "a number >= 1")
        if self.study_name is not None:
            _check("tune.study_name", self.study_name, bool(self.study_name.strip()), "a non-empty string or null")


def searchable_keys() -> list[str]:
    keys = []
    for section in SEARCHABLE_SECTIONS:
        hints, fields = _hints(SECTIONS[section])
        keys += [f"{section}.{f}" for f in fields if float in (hints[f], *getattr(hints[f], "__args__", ()))]
    return [k for k in keys if k != "optim.lr"]


def build_tune_cfg(values: dict[str, Any]) -> TuneCfg:
    """A validated :class:`TuneCfg` from the composed ``tune`` dict, with one-line errors."""
    hints, fields = _hints(TuneCfg)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"tune.{key} is not a known key; valid keys: {', '.join('tune.' + f for f in fields)}")
        if key == "search":
            kwargs[key] = _search_dims(value)
        else:
            kwargs[key] = _coerce(f"tune.{key}", value, hints[key])
    return TuneCfg(**kwargs)


def _search_dims(value: Any) -> list[SearchDim]:
    if value is None:
        return []
    if not isinstance(value, dict):
        raise ConfigError(f"tune.search={value!r} is not valid; it must be a mapping like "
                          "{train.clip_norm: {low: 0.1, high: 100, log: true}}")
    valid = searchable_keys()
    dims = []
    for key, spec in value.items():
        if key not in valid:
            raise ConfigError(f"tune.search key {key!r} is not valid; valid keys: {', '.join(valid)}")
        if not isinstance(spec, dict) or set(spec) - {"low", "high", "log"} or not {"low", "high"} <= set(spec):
            raise ConfigError(f"tune.search.{key}={spec!r} is not valid; it must be {{low: <number>, high: <number>, "
                              "log: true|false}}")
        low = _coerce(f"tune.search.{key}.low", spec["low"], float)
        high = _coerce(f"tune.search.{key}.high", spec["high"], float)
        log_ = _coerce(f"tune.search.{key}.log", spec.get("log", False), bool)
        _check(f"tune.search.{key}.high", high, math.isfinite(low) and math.isfinite(high) and low < high,
               f"a finite number > tune.search.{key}.low ({low:g})")
        _check(f"tune.search.{key}.low", low, not log_ or low > 0, "> 0 with log: true")
        dims.append(SearchDim(key, low, high, log_))
    return dims


# ---------------------------------------------------------------------------------------------------------
# Composition and storage


def compose(overrides: list[str]) -> tuple[dict[str, Any], RunCfg, TuneCfg]:
    """Compose ``gradsweep/conf/`` plus the ``tune`` group; return the plain config, the base run and the tune settings."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    from gradsweep.preflight import _one_line, check_overrides, compose_values

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(_one_line(e)) from None
    for o in parsed:
        if o.is_sweep_override():
            raise ConfigError(f"{o.input_line} is a sweep; gradsweep.tune takes one value per key "
                              "(sweep with python -m gradsweep -m)")
        if o.key_or_group.startswith("hydra"):
            raise ConfigError(f"{o.input_line}: hydra.* keys do not apply to gradsweep.tune (use tune.out_dir)")
        section, _, key = o.key_or_group.partition(".")
        fields = _hints(TuneCfg)[1]
        if section == TUNE_DIR and key.split(".")[0] not in fields:
            raise ConfigError(f"{o.key_or_group} is not a known key; valid keys: {', '.join('tune.' + f for f in fields)}")
    run_overrides = [o.input_line for o in parsed if o.key_or_group.split(".")[0] != TUNE_DIR]
    check_overrides(run_overrides)
    values = compose_values([f"+{TUNE_DIR}=default", *overrides])
    tune = build_tune_cfg(values.pop(TUNE_DIR))
    base = build_run_cfg(values)
    for dim in tune.search:  # every bound must make a valid run
        for bound in (dim.low, dim.high):
            trial_values(values, tune.lr_min, {dim.key: bound}, check=True)
    return values, base, tune


def default_study_name(base: RunCfg) -> str:
    m = base.model
    return f"lr-{m.activation}-d{m.depth}-w{m.width}-{base.init.name}-{base.optim.name}-{config_hash(base)[:8]}"


def trial_values(values: dict[str, Any], lr: float, extra: dict[str, float], check: bool = False) -> dict[str, Any]:
    """The plain config of one trial: ``values`` with optim.lr and the extra dimensions set."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    out["optim"]["lr"] = lr
    for key, v in extra.items():
        section, name = key.split(".", 1)
        out[section][name] = v
    if check:
        build_run_cfg(out)
    return out


def redact(url: str) -> str:
    """A storage URL without its password."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def open_storage(tune: TuneCfg, out_dir: Path) -> tuple[Any, str]:
    """The study's storage and its description: a journal file by default, an RDB for any SQLAlchemy URL."""
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    url = tune.storage
    if url is None or "://" not in url:
        path = Path(url) if url else out_dir / TUNE_DIR / JOURNAL_FILE
        if path.exists() and not path.is_file():
            raise ConfigError(f"tune.storage={str(path)!r} is not valid; it is not a file")
        _check_journal(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path))), str(path)
        except OSError as e:
            raise ConfigError(f"tune.storage={str(path)!r} cannot be opened: {e.strerror or e}") from None
        except ValueError as e:
            raise ConfigError(f"tune.storage={str(path)!r} cannot be read: {first_line(e)}") from None
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(TABLE_CREATION_TRIES):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                                                 skip_table_creation=False)
            return storage, redact(url)
        except (IntegrityError, ProgrammingError) as e:
            # Workers starting together on an empty database race to create Optuna's tables; the loser's
            # CREATE fails on a duplicate catalog entry (PostgreSQL: UniqueViolation on pg_type, or
            # DuplicateTable). The tables exist by then: try again.
            if isinstance(e, ProgrammingError) and "already exists" not in str(e):
                raise ConfigError(f"tune.storage={redact(url)!r} cannot be used: {first_line(e)}") from None
            if attempt == TABLE_CREATION_TRIES - 1:
                raise ConfigError(f"tune.storage={redact(url)!r}: Optuna's tables could not be created "
                                  f"({TABLE_CREATION_TRIES} tries)") from None
            time.sleep(0.2 * (attempt + 1))
        except Exception as e:  # unreachable server, bad credentials, unknown dialect, missing driver
            first = first_line(e)
            raise ConfigError(f"tune.storage={redact(url)!r} is not reachable: {first}") from None
    raise AssertionError("unreachable")


def _named_constraints() -> bool:
    """Optuna >= 5 records constraints per trial (``Trial.set_constraint``), and deprecates ``constraints_func``."""
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def _check_journal(path: Path) -> None:
    """Refuse a journal file that is not Optuna's before anything is appended to it (a torn last line, which
    Optuna itself skips, is allowed)."""
    if not path.is_file():
        return
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise ConfigError(f"tune.storage={str(path)!r} cannot be read: {e.strerror or e}") from None
    if len(lines) == 1:  # a single torn record is no study yet; anything else there is not a journal
        lines = lines + [b""]
    for n, line in enumerate(lines[:-1], start=1):
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and "op_code" in record
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"tune.storage={str(path)!r} is not an Optuna journal (line {n} is not one of its "
                              "records); give another tune.storage")


def make_sampler(tune: TuneCfg, seed: int) -> Any:
    """The sampler by name; on Optuna 4 the constraints reach it through ``constraints_func``."""
    import optuna

    c = None if _named_constraints() else constraints_of
    if tune.sampler == "tpe":
        # constant_liar: trials asked together in a batch are spread out instead of all proposed alike.
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, constraints_func=c)
    if tune.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tune.sampler == "qmc":
        return optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False)
    if tune.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, constraints_func=c)
    if tune.sampler == "nsgaii":
        return optuna.samplers.NSGAIISampler(seed=seed, constraints_func=c)
    try:
        import cmaes  # noqa: F401
    except ImportError:
        raise ConfigError("tune.sampler='cmaes' needs the cmaes package (pip install cmaes); "
                          f"valid values here: {', '.join(s for s in SAMPLERS if s != 'cmaes')}") from None
    return optuna.samplers.CmaEsSampler(seed=seed)


# each holds when its value is <= 0: one per verdict that is not healthy (gradsweep.verdicts), and the loss fell
CONSTRAINTS = ("diverged", "dead", "vanishing", "exploding", "stalled", "loss_increased")


def constraints_of(trial: Any) -> list[float]:
    """Optuna 4's ``constraints_func``: the values recorded with the trial, in ``CONSTRAINTS`` order."""
    return list(trial.user_attrs.get("constraints", [1.0] * len(CONSTRAINTS)))


# ---------------------------------------------------------------------------------------------------------
# Trials


def trial_outcome(row: Any, tune: TuneCfg, steps_loss: Any) -> tuple[float, dict[str, Any]]:
    """The objective value and the user attributes of a trained trial from its runs-table row.

    One constraint per way a run can fail to be ``healthy`` (gradsweep.verdicts), each from its own condition
    whatever the precedence, plus ``loss_increased`` (final loss above the initial); > 0 means violated, and its
    size says by how much where there is a measure (log10 decades of the ratio, loss above the stall line). So a
    trial is feasible exactly when its verdict is healthy and its loss fell. A diverged run's objective is +inf
    (kept, marked infeasible).
    """
    import numpy as np

    from gradsweep.verdicts import conditions

    diverged = not pd.isna(row["diverged_step"])
    dead = not pd.isna(row["dead_step"])
    ratio, median = float(row["grad_ratio_log10"]), float(row["grad_ratio_log10_median"])
    final, initial, baseline = float(row["final_loss"]), float(row["initial_loss"]), float(row["baseline_loss"])
    lo, hi, margin = (float(row[f"verdict.{k}"]) for k in ("vanish_below", "explode_above", "stall_margin"))
    if tune.objective == "final_loss":
        value = final
    else:
        value = float(steps_loss.mean()) if len(steps_loss) else math.nan
    if diverged or not math.isfinite(value):
        value = math.inf
    cond = {k: bool(v[0]) for k, v in conditions(*(np.array([x]) for x in (ratio, median, final, baseline, lo, hi,
                                                                           margin))).items()}
    increased = not (math.isfinite(final) and math.isfinite(initial) and final <= initial)
    measured = {
        "diverged": 1.0, "dead": 1.0,
        "vanishing": max(lo - ratio, lo - median) if math.isfinite(ratio) and math.isfinite(median) else 1.0,
        "exploding": max(ratio - hi, median - hi) if math.isfinite(ratio) and math.isfinite(median) else 1.0,
        "stalled": final - (1 - margin) * baseline if math.isfinite(final) and math.isfinite(baseline) else 1.0,
        "loss_increased": final - initial if math.isfinite(final) and math.isfinite(initial) else 1.0,
    }
    violated = {"diverged": diverged, "dead": dead, "vanishing": cond["vanishing"], "exploding": cond["exploding"],
                "stalled": cond["stalled"], "loss_increased": increased}
    constraints = [_signed(measured[k], violated[k]) for k in CONSTRAINTS]
    attrs = {
        "constraints": constraints,
        "feasible": not any(violated.values()),
        "diverged": diverged,
        "final_loss": final if math.isfinite(final) else None,
        "initial_loss": initial,
        "baseline_loss": baseline if math.isfinite(baseline) else None,
        "grad_ratio_log10": ratio if math.isfinite(ratio) else None,
        "verdict": row["verdict"],
        "run_id": row["run_id"],
    }
    return value, attrs


def _signed(magnitude: float, violated: bool) -> float:
    """A constraint value whose sign is the verdict's (> 0 violated) and whose size is the measured margin."""
    size = max(abs(magnitude), 1e-12)
    return size if violated else -size


class RunIndex:
    """The complete runs under a tune directory (a group's runs.parquet, written last, exists), by run id: the
    runs-table record, the group directory and the run's directory. :meth:`refresh` reads only groups it has
    not read yet, so a long study costs one read per group, not one per group per batch."""

    def __init__(self, tdir: Path) -> None:
        self.tdir = tdir
        self.runs: dict[str, tuple[dict[str, Any], Path, Path]] = {}
        self._read: set[str] = set()

    def refresh(self) -> RunIndex:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from gradsweep.tables import GROUPS_DIR, RUNS_FILE

        for f in sorted((self.tdir / GROUPS_DIR).glob(f"*/{RUNS_FILE}")):
            if f.parent.name in self._read:
                continue
            self._read.add(f.parent.name)
            table = pq.read_table(f).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get)
            for rec in table.to_dict("records"):
                self.runs.setdefault(rec["run_id"], (rec, f.parent, (f.parent / rec["run_dir"]).resolve()))
        return self


def _losses(group_dir: Path, run_ids: list[str]) -> dict[str, Any]:
    """Each run's logged training losses, from its group's steps table."""
    import pyarrow.parquet as pq

    from gradsweep.tables import STEPS_FILE

    t = pq.read_table(group_dir / STEPS_FILE, columns=["run_id", "loss"],
                      filters=[("layer", "=", 1), ("run_id", "in", run_ids)]).to_pandas()
    return {rid: g["loss"].to_numpy() for rid, g in t.groupby("run_id", observed=True)}


def run_batch(study: Any, trials: list[Any], values: dict[str, Any], tune: TuneCfg, tdir: Path,
              index: RunIndex | None = None) -> list[tuple[float, dict[str, Any]] | Exception]:
    """Train one batch of asked trials (one fused group per architecture, through ``launcher.run_chunk``, the
    runner's unit of work) and write their tables. A trial whose configuration already has complete tables
    under ``tdir`` (a trial queued again after its worker died once they were written) is read, not trained.
    Returns each trial's (objective, user attributes), or the exception that failed it."""
    from gradsweep.launcher import run_chunk
    from gradsweep.tables import GROUPS_DIR, write_job_files
    from gradsweep.train import group_key

    params = []
    for t in trials:
        lr = t.suggest_float("lr", tune.lr_min, tune.lr_max, log=True)
        extra = {d.key: t.suggest_float(d.key, d.low, d.high, log=d.log) for d in tune.search}
        params.append((lr, extra))
    plain = [trial_values(values, lr, extra) for lr, extra in params]
    cfgs = [build_run_cfg(p) for p in plain]
    overrides = [[f"optim.lr={lr!r}", *(f"{k}={v!r}" for k, v in extra.items())] for lr, extra in params]
    run_ids = [config_hash(c) for c in cfgs]
    known: dict[str, Any] = dict((index or RunIndex(tdir)).refresh().runs)
    first_of: dict[str, int] = {}  # a configuration asked twice in one batch is trained once
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(cfgs):
        if run_ids[i] not in known and first_of.setdefault(run_ids[i], i) == i:
            groups.setdefault(group_key(c), []).append(i)
    for members in groups.values():
        group_dir = tdir / GROUPS_DIR / str(trials[members[0]].number)
        for i in members:
            study._storage.set_trial_system_attr(trials[i]._trial_id, GROUP_ATTR, group_dir.name)
        meta = [{"job_num": trials[i].number, "override_dirname": ",".join(overrides[i])} for i in members]
        dirs = [tdir / "trials" / str(trials[i].number) for i in members]
        records, failures, line = run_chunk([cfgs[i] for i in members], meta, dirs,
                                            [(plain[i], overrides[i]) for i in members], ".hydra", group_dir)
        log.info(f"trials {', '.join(str(trials[i].number) for i in members)}: {line}")
        for i, rec, err, run_dir in zip(members, records, failures, dirs):
            known[run_ids[i]] = (rec, group_dir, run_dir) if err is None else err
    results: list[tuple[float, dict[str, Any]] | Exception] = []
    for i in range(len(trials)):
        got = known[run_ids[i]]
        if isinstance(got, Exception):
            results.append(got)
            continue
        rec, group_dir, run_dir = got
        if not (run_dir / ".hydra" / "config.yaml").is_file():  # its worker died before its job files
            write_job_files(run_dir, plain[i], overrides[i], ".hydra")
        loss = _losses(group_dir, [rec["run_id"]]).get(rec["run_id"], []) if tune.objective == "loss_auc" else []
        results.append(trial_outcome(rec, tune, pd.Series(loss, dtype=float)))
    return results


# ---------------------------------------------------------------------------------------------------------
# Workers that die: a trial left RUNNING by a killed worker is failed and queued again


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def stale_reason(trial: Any, now: float, stale_after_s: float) -> str | None:
    """Why a RUNNING trial's worker is gone, or None while it may still be training it.

    Gone: its worker ran on this machine and its process is dead, or no heartbeat (a system attribute each
    worker refreshes every ``stale_after_s / 4`` while it trains) for ``stale_after_s`` seconds.
    """
    from gradsweep.launcher import process_alive

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


def _fail_and_requeue(study: Any, trial: Any, tdir: Path, why: str) -> bool:
    """Mark a trial FAIL (unless another worker got there first), remove what it left half-written, and queue
    a retry with the same parameters (Optuna's RetryHeartbeatStaleTrialCallback). True if this call failed it."""
    import optuna

    try:
        study._storage.set_trial_system_attr(trial._trial_id, "gradsweep_failed", why)
        if not study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False
    frozen = study._storage.get_trial(trial._trial_id)
    _remove_partial(tdir, frozen)
    import warnings

    with warnings.catch_warnings():  # experimental since Optuna 2.8, and the way Optuna itself retries trials
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback",
                        getattr(optuna.storages, "RetryFailedTrialCallback", None))(max_retry=MAX_RETRY)
    n_before = len(study.get_trials(deepcopy=False))
    frozen.system_attrs.pop("gradsweep_failed", None)
    retry(study, _without_worker(frozen))
    queued = len(study.get_trials(deepcopy=False)) > n_before
    log.warning(f"trial {frozen.number} was left RUNNING ({why}): marked FAIL"
                + (", queued again with the same parameters" if queued else f", not queued again ({MAX_RETRY} retries)"))
    return True


def _without_worker(trial: Any) -> Any:
    import copy

    t = copy.deepcopy(trial)
    for key in (WORKER_ATTR, BEAT_ATTR, GROUP_ATTR):
        t.system_attrs.pop(key, None)
    return t


def _remove_partial(tdir: Path, trial: Any) -> None:
    """A dead worker's trial: its group directory if that group never completed, its job directory with it,
    and any temporaries its writers left."""
    from gradsweep.tables import GROUPS_DIR, RUNS_FILE

    group = trial.system_attrs.get(GROUP_ATTR)
    run_dir = tdir / "trials" / str(trial.number)
    if group is not None and not (tdir / GROUPS_DIR / str(group) / RUNS_FILE).is_file():
        shutil.rmtree(tdir / GROUPS_DIR / str(group), ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)
    for tmp in (*run_dir.rglob(".*.tmp-*"), *(tdir / GROUPS_DIR / str(group)).glob(".*.tmp-*")) if group else ():
        tmp.unlink(missing_ok=True)


def recover_stale(study: Any, tdir: Path, stale_after_s: float) -> list[int]:
    """Fail and queue again every RUNNING trial whose worker is gone; the numbers of those this call failed."""
    import optuna

    now = time.time()
    failed = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        why = stale_reason(t, now, stale_after_s)
        if why is not None and _fail_and_requeue(study, t, tdir, why):
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
                self.study._storage.set_trial_system_attr(t._trial_id, BEAT_ATTR, now)
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


def tune_study(values: dict[str, Any], base: RunCfg, tune: TuneCfg, quiet: bool = False) -> dict[str, Any]:
    """Run ``tune.n_trials`` more trials of the study in batches; write and return the summary."""
    import optuna

    from gradsweep.progress import bar as progress_bar

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = tune.study_name or default_study_name(base)
    out_dir = Path(tune.out_dir) if tune.out_dir else Path("outputs") / TUNE_DIR / name
    tdir = out_dir / TUNE_DIR
    storage, where = open_storage(tune, out_dir)
    base_hash = config_hash(base)
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        existing = None
    except Exception as e:  # a corrupt journal, a database that is not Optuna's
        first = first_line(e)
        raise ConfigError(f"tune.storage={where!r} cannot be read: {first}") from None
    if existing is not None:
        made_for = existing.user_attrs.get(BASE_ATTR)
        if made_for is not None and made_for != base_hash:
            raise ConfigError(f"tune.study_name={name!r} is not valid here: that study in {where} was created for "
                              "another configuration; choose another tune.study_name or tune.storage")
        if existing.direction != optuna.study.StudyDirection.MINIMIZE:
            raise ConfigError(f"tune.study_name={name!r} is not valid here: that study is not a minimisation")
    n_before = len(existing.trials) if existing is not None else 0
    sampler = make_sampler(tune, tune.seed + n_before)
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True,
                                    sampler=sampler)
    except Exception as e:  # e.g. a journal whose lines are not Optuna's
        first = first_line(e)
        raise ConfigError(f"tune.storage={where!r} cannot be read: {first}") from None
    if existing is None:
        study.set_user_attr(BASE_ATTR, base_hash)
    tdir.mkdir(parents=True, exist_ok=True)
    progress = not (quiet or base.quiet)
    bar = progress_bar(total=tune.n_trials, desc=f"tune {name}", unit="trial", quiet=not progress)
    t0 = time.perf_counter()
    done = 0
    failed: list[tuple[int, Exception]] = []
    me = worker_id()
    index = RunIndex(tdir)
    try:
        while done < tune.n_trials:
            recover_stale(study, tdir, tune.stale_after_s)
            k = min(tune.batch_size, tune.n_trials - done)
            trials = []
            for _ in range(k):
                trials.append(study.ask())
                study._storage.set_trial_system_attr(trials[-1]._trial_id, WORKER_ATTR, me)
            told = 0
            try:
                with Heartbeat(study, trials, tune.stale_after_s / 4):
                    outcomes = run_batch(study, trials, values, tune, tdir, index)
                for trial, outcome in zip(trials, outcomes):
                    _tell(study, trial, outcome)
                    if isinstance(outcome, Exception):
                        failed.append((trial.number, outcome))
                    told += 1
            except BaseException as e:
                for trial in trials[told:]:  # never leave asked trials RUNNING in a shared study
                    try:
                        if isinstance(e, Exception):
                            study.tell(trial, state=optuna.trial.TrialState.FAIL)
                        else:  # interrupted (Ctrl-C): queued again like a dead worker's
                            _fail_and_requeue(study, trial, tdir, "interrupted")
                    except Exception:
                        pass
                raise
            done += k
            bar.update(k)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    summary = summarize(study, tune, where, out_dir)
    summary["this_invocation"] = {"trials": tune.n_trials, "batch_size": tune.batch_size, "wall_s": wall}
    summary["failed"] = [{"trial": n, "error": f"{type(e).__name__}: {first_line(e)}"} for n, e in failed]
    write_outputs(study, summary, tdir)
    return summary


def _tell(study: Any, trial: Any, outcome: tuple[float, dict[str, Any]] | Exception) -> None:
    import optuna

    try:
        if isinstance(outcome, Exception):
            study._storage.set_trial_user_attr(trial._trial_id, "error", f"{type(outcome).__name__}: "
                                               f"{first_line(outcome)}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        value, attrs = outcome
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        if _named_constraints():
            for key, v in zip(CONSTRAINTS, attrs["constraints"]):
                trial.set_constraint(key, v)
        study.tell(trial, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Another worker took this one for dead (no heartbeat for tune.stale_after_s) and queued it again:
        # its retry reads the tables written here instead of training them again.
        log.warning(f"trial {trial.number} was failed as stale by another worker meanwhile; its retry reuses "
                    "these tables")


# ---------------------------------------------------------------------------------------------------------
# Results


def trial_frame(study: Any) -> Any:
    """One row per finished trial: number, lr, extra params, value, feasible, diverged, state."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if "lr" not in t.params:
            continue
        rows.append({"number": t.number, "state": t.state.name, **t.params,
                     "value": t.value if t.value is not None else math.nan,
                     "feasible": bool(t.user_attrs.get("feasible", False)),
                     "diverged": bool(t.user_attrs.get("diverged", False)),
                     "final_loss": t.user_attrs.get("final_loss"), "initial_loss": t.user_attrs.get("initial_loss"),
                     "grad_ratio_log10": t.user_attrs.get("grad_ratio_log10"), "verdict": t.user_attrs.get("verdict"),
                     "baseline_loss": t.user_attrs.get("baseline_loss"), "run_id": t.user_attrs.get("run_id")})
    return pd.DataFrame(rows)


EDGE_DEFINITION = ("stable = the run's whole-run verdict is healthy and its loss fell. A stable band is a range of "
                   "learning rates, sorted, with no unstable trial inside it; the band reported is the widest one (in "
                   "decades of lr), its edges the nearest unstable trials above and below it. The best stable lr is "
                   "the lowest-loss trial of the band at least tune.safety times below the first unstable lr above "
                   "it (near the edge, whether a deep net dies is a matter of chance). A stable trial alone between "
                   "unstable neighbours is not recommended.")


def stable_band(frame: Any) -> tuple[Any, dict[str, Any]]:
    """The complete trials of the widest stable band (``EDGE_DEFINITION``) and its edges.

    Edges: ``smallest_stable_lr`` .. ``largest_stable_lr`` (no unstable trial between), ``smallest_unstable_lr_above``
    and ``largest_unstable_lr_below`` (None where no trial is unstable on that side), ``band_trials``.
    """
    edge: dict[str, Any] = {"smallest_stable_lr": None, "largest_stable_lr": None, "smallest_unstable_lr_above": None,
                            "largest_unstable_lr_below": None, "band_trials": 0}
    done = frame[frame["state"] == "COMPLETE"] if len(frame) else frame
    if not len(done):
        return done, edge
    # Sorted by lr; at an equal lr an unstable trial ends the band (so no unstable trial is ever inside one).
    done = done.assign(_unstable=~done["feasible"].astype(bool)).sort_values(["lr", "_unstable"], kind="stable")
    band_id = done["_unstable"].cumsum()  # each unstable trial starts a new id: stable runs share one
    stable = done[~done["_unstable"]]
    if not len(stable):
        edge["smallest_unstable_lr_above"] = float(done["lr"].min())
        return stable, edge

    def width(ids: Any) -> tuple[float, int, float]:
        lrs = stable.loc[ids, "lr"].astype(float)
        return (math.log10(lrs.max() / lrs.min()), len(lrs), -float(stable.loc[ids, "value"].min()))

    groups = stable.groupby(band_id[~done["_unstable"]]).groups
    chosen = stable.loc[max(groups.values(), key=width)]
    lo, hi = float(chosen["lr"].min()), float(chosen["lr"].max())
    unstable = done[done["_unstable"]]["lr"].astype(float)
    above, below = unstable[unstable > hi], unstable[unstable < lo]
    edge.update(smallest_stable_lr=lo, largest_stable_lr=hi, band_trials=int(len(chosen)),
                smallest_unstable_lr_above=float(above.min()) if len(above) else None,
                largest_unstable_lr_below=float(below.max()) if len(below) else None)
    return chosen.drop(columns="_unstable"), edge


def _float_or_none(v: Any) -> float | None:
    return None if v is None or pd.isna(v) else float(v)


def summarize(study: Any, tune: TuneCfg, where: str, out_dir: Path) -> dict[str, Any]:
    frame = trial_frame(study)
    done = frame[frame["state"] == "COMPLETE"] if len(frame) else frame
    feasible = done[done["feasible"]] if len(done) else done
    band, edge = stable_band(frame)
    best = isolated = None
    if len(band):
        up = edge["smallest_unstable_lr_above"]
        safe = band[band["lr"] <= up / tune.safety] if up is not None else band
        safe = safe if len(safe) else band.nsmallest(1, "lr")  # the whole band is near the edge: its lowest lr
        b = safe.loc[safe["value"].idxmin()]
        overall = feasible.loc[feasible["value"].idxmin()]
        if overall["number"] != b["number"] and overall["number"] not in set(band["number"]):
            isolated = {"trial": int(overall["number"]), "lr": float(overall["lr"]), "loss": float(overall["value"])}
        best = {"trial": int(b["number"]), "lr": float(b["lr"]), "loss": float(b["value"]), "run_id": b["run_id"],
                "final_loss": _float_or_none(b["final_loss"]), "baseline_loss": _float_or_none(b["baseline_loss"]),
                "params": {k: float(b[k]) for k in ["lr", *[d.key for d in tune.search]] if k in b}}
    return {
        "study_name": study.study_name, "storage": where, "out_dir": str(out_dir),
        "objective": tune.objective,
        "constraints": {"diverged": "no NaN/Inf in the loss or the gradient norm",
                        "dead": "some signal reaches the first Linear layer at the end of training",
                        "vanishing": "grad_ratio_log10 >= verdict.vanish_below at step 0 and as its median over training",
                        "exploding": "grad_ratio_log10 <= verdict.explode_above at step 0 and as its median over training",
                        "stalled": "final_loss < (1 - verdict.stall_margin) * baseline_loss",
                        "loss_increased": "final_loss <= initial_loss"},
        "edge_definition": EDGE_DEFINITION.replace("tune.safety", f"tune.safety ({tune.safety:g})"),
        "trials": int(len(frame)), "complete": int(len(done)), "feasible": int(len(feasible)),
        "diverged": int(done["diverged"].sum()) if len(done) else 0,
        "best": best, "edge": edge,
        # a lower loss than the best's, but outside the band: unstable trials at nearby learning rates on both sides
        "isolated_better_trial": isolated,
    }


def write_outputs(study: Any, summary: dict[str, Any], tdir: Path) -> None:
    """best.json, trials.csv and stability.png, each appearing atomically."""
    from gradsweep.figures import plt, stability_plot
    from gradsweep.tables import atomic, write_text_atomic

    frame = trial_frame(study)
    write_text_atomic(tdir / "best.json", json.dumps(summary, indent=2, default=_json_default) + "\n")
    write_text_atomic(tdir / "trials.csv", frame.to_csv(index=False))
    fig = stability_plot(frame, summary)
    with atomic(tdir / "stability.png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def describe(summary: dict[str, Any]) -> str:
    best, edge = summary["best"], summary["edge"]
    lines = [f"study {summary['study_name']} ({summary['storage']}): {summary['trials']} trials, "
             f"{summary['feasible']} stable, {summary['diverged']} diverged"]
    if best:
        lines.append(f"best stable lr = {best['lr']:.4g} (trial {best['trial']}, {summary['objective']} "
                     f"{best['loss']:.4g}; the lowest loss in the stable band, at least tune.safety below its edge)")
    else:
        lines.append("no stable learning rate found in [tune.lr_min, tune.lr_max]")
    lines.append("stability edge: " + edge_words(edge))
    iso = summary.get("isolated_better_trial")
    if iso:
        lines.append(f"not recommended: trial {iso['trial']} (lr {iso['lr']:.4g}, {summary['objective']} {iso['loss']:.4g}) "
                     "trained, but it lies outside the stable band, between unstable trials")
    lines.append(f"wrote {Path(summary['out_dir']) / TUNE_DIR}/best.json, stability.png, trials.csv")
    return "\n".join(lines)


def edge_words(edge: dict[str, float | None]) -> str:
    """'stable from lr a up to lr b, unstable from lr c (and below lr d)', as far as the trials tell."""
    lo, hi = edge["smallest_stable_lr"], edge["largest_stable_lr"]
    up, down = edge["smallest_unstable_lr_above"], edge.get("largest_unstable_lr_below")
    if hi is None:
        return "nothing stable" + (f"; unstable from lr {up:.4g}" if up is not None else "")
    text = f"stable from lr {lo:.4g} up to lr {hi:.4g} ({edge.get('band_trials', 0)} trials, none unstable), "
    text += f"unstable from lr {up:.4g}" if up is not None else "nothing unstable seen above it"
    return text + (f"; unstable again below lr {down:.4g}" if down is not None else "")


HELP = """usage: python -m gradsweep.tune [overrides]

Search the learning rate that trains fastest without instability, with Optuna; trials are trained in fused
batches. Overrides are the runner's (model.depth=30 init=kaiming ...) plus tune.* (gradsweep/conf/tune/default.yaml):
  tune.n_trials, tune.batch_size, tune.lr_min, tune.lr_max, tune.search, tune.sampler, tune.seed,
  tune.objective, tune.study_name, tune.storage, tune.out_dir, tune.stale_after_s, tune.safety
Rerunning the same command continues the same study; trials a killed worker left running are queued again. Open it with:
  optuna-dashboard <storage>   (the journal file, or the SQLAlchemy URL, printed at the end)
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(HELP, end="")
        return
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    try:
        values, base, tune = compose(argv)
        summary = tune_study(values, base, tune)
    except ConfigError as e:
        print(f"gradsweep.tune: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("gradsweep.tune: interrupted; the trials in training are queued again: rerun the same command to go on",
              file=sys.stderr)
        sys.exit(130)
    print(describe(summary))
    if summary["failed"]:
        first = summary["failed"][0]
        print(f"gradsweep.tune: error: {len(summary['failed'])} of {tune.n_trials} trials failed (the first, trial "
              f"{first['trial']}: {first['error']}); the study keeps them as FAIL", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
