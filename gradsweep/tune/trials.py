"""Trials: each asked trial's configuration, trained in fused groups through ``groups.run_group`` (the runner's
unit of work) and read back as Optuna's objective and constraints."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pandas as pd

from gradsweep.config.identity import config_hash
from gradsweep.engine.arrays import bound_run_cfg
from gradsweep.results.schema import GROUPS_DIR, JOB_SUBDIR, STEPS_FILE, TRIALS_DIR
from gradsweep.results.store import CompleteRun, RunIndex, write_job_files
from gradsweep.sweep.group import GroupJob, plan, run_group
from gradsweep.tune.config import TuneCfg
from gradsweep.tune.results import CURVATURE_ATTRS
from gradsweep.tune.study import CONSTRAINTS, GROUP_ATTR, set_system_attr

log = logging.getLogger("gradsweep.tune")


def trial_values(values: dict[str, Any], lr: float, extra: dict[str, float], check: bool = False) -> dict[str, Any]:
    """The plain config of one trial: ``values`` with optim.lr and the extra dimensions set."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in values.items()}
    out["optim"]["lr"] = lr
    for key, v in extra.items():
        section, name = key.split(".", 1)
        out[section][name] = v
    if check:
        bound_run_cfg(out)
    return out


def trial_outcome(row: Any, tune: TuneCfg, steps_loss: Any) -> tuple[float, dict[str, Any]]:
    """The objective value and the user attributes of a trained trial from its runs-table row.

    One constraint per way a run can fail to be ``healthy`` (gradsweep.results.verdicts), each from its own condition
    whatever the precedence, plus ``loss_increased`` (final loss above the initial); > 0 means violated, and its
    size says by how much where there is a measure (log10 decades of the ratio, loss above the stall line). So a
    trial is feasible exactly when its verdict is healthy and its loss fell. A diverged run's objective is +inf
    (kept, marked infeasible).
    """
    import numpy as np

    from gradsweep.results.verdicts import conditions

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
        **{k: _plain(row.get(k)) for k in CURVATURE_ATTRS},
    }
    return value, attrs


def _plain(v: Any) -> Any:
    """A runs-table value as Optuna stores a user attribute (JSON): None for null or NaN, else float or str."""
    if v is None or (not isinstance(v, str) and pd.isna(v)):
        return None
    return v if isinstance(v, str) else float(v)


def _signed(magnitude: float, violated: bool) -> float:
    """A constraint value whose sign is the verdict's (> 0 violated) and whose size is the measured margin."""
    size = max(abs(magnitude), 1e-12)
    return size if violated else -size


def _losses(group_dir: Path, run_ids: list[str]) -> dict[str, Any]:
    """Each run's logged training losses, from its group's steps table."""
    import pyarrow.parquet as pq

    t = pq.read_table(group_dir / STEPS_FILE, columns=["run_id", "loss"],
                      filters=[("layer", "=", 1), ("run_id", "in", run_ids)]).to_pandas()
    return {rid: g["loss"].to_numpy() for rid, g in t.groupby("run_id", observed=True)}


def run_batch(study: Any, trials: list[Any], values: dict[str, Any], tune: TuneCfg, tdir: Path,
              index: RunIndex | None = None) -> list[tuple[float, dict[str, Any]] | Exception]:
    """Train one batch of asked trials (one fused group per architecture, through ``groups.run_group``, the
    runner's unit of work) and write their tables. A trial whose configuration already has complete tables
    under ``tdir`` (a trial queued again after its worker died once they were written) is read, not trained.
    Returns each trial's (objective, user attributes), or the exception that failed it."""
    params = []
    for t in trials:
        lr = t.suggest_float("lr", *tune.lr_range(), log=True)
        extra = {d.key: t.suggest_float(d.key, d.low, d.high, log=d.log) for d in tune.search}
        params.append((lr, extra))
    plain = [trial_values(values, lr, extra) for lr, extra in params]
    cfgs = [bound_run_cfg(p) for p in plain]
    overrides = [[f"optim.lr={lr!r}", *(f"{k}={v!r}" for k, v in extra.items())] for lr, extra in params]
    run_ids = [config_hash(c) for c in cfgs]
    known: dict[str, CompleteRun | Exception] = dict((index or RunIndex(tdir)).refresh().by_id)
    first_of: dict[str, int] = {}  # a configuration asked twice in one batch is trained once
    todo = [i for i in range(len(cfgs)) if run_ids[i] not in known and first_of.setdefault(run_ids[i], i) == i]
    for members in plan(cfgs, todo):
        group_dir = tdir / GROUPS_DIR / str(trials[members[0]].number)
        for i in members:
            set_system_attr(study, trials[i], GROUP_ATTR, group_dir.name)
        dirs = [tdir / TRIALS_DIR / str(trials[i].number) for i in members]
        job = GroupJob(cfgs=[cfgs[i] for i in members],
                       meta=[{"job_num": trials[i].number, "override_dirname": ",".join(overrides[i])} for i in members],
                       run_dirs=dirs, job_files=[(plain[i], overrides[i]) for i in members], output_subdir=JOB_SUBDIR,
                       group_dir=group_dir)
        result = run_group(job)
        log.info(f"trials {', '.join(str(trials[i].number) for i in members)}: {result.line}")
        for i, rec, err, run_dir in zip(members, result.records, result.failures, dirs):
            known[run_ids[i]] = CompleteRun(rec, group_dir, run_dir) if err is None else err
    results: list[tuple[float, dict[str, Any]] | Exception] = []
    for i in range(len(trials)):
        got = known[run_ids[i]]
        if isinstance(got, Exception):
            results.append(got)
            continue
        if not (got.run_dir / JOB_SUBDIR / "config.yaml").is_file():  # its worker died before its job files
            write_job_files(got.run_dir, plain[i], overrides[i], JOB_SUBDIR)
        rid = got.record["run_id"]
        loss = _losses(got.group_dir, [rid]).get(rid, []) if tune.objective == "loss_auc" else []
        results.append(trial_outcome(got.record, tune, pd.Series(loss, dtype=float)))
    return results
