"""``python -m gradsweep.tune``: compose the base run and the ``tune`` settings, then ask, train and tell trials in
batches until ``tune.n_trials`` more are done."""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from gradsweep.config.checks import check, coerce, field_hints
from gradsweep.config.sections import SECTIONS, RunCfg
from gradsweep.engine.arrays import bound_run_cfg
from gradsweep.errors import ConfigError, first_line
from gradsweep.results.schema import TUNE_DIR
from gradsweep.results.store import RunIndex
from gradsweep.tune.config import PRIOR_PROBES, SearchDim, TuneCfg, register
from gradsweep.tune.prior import curvature_prior
from gradsweep.tune.recovery import Heartbeat, fail_and_requeue, recover_stale, worker_id
from gradsweep.tune.results import best_of_study, describe, write_outputs
from gradsweep.tune.study import CONSTRAINTS, WORKER_ATTR, default_study_name, named_constraints, open_study, set_system_attr
from gradsweep.tune.trials import run_batch, trial_values

log = logging.getLogger("gradsweep.tune")

SEARCHABLE_SECTIONS = ("optim", "train", "init")  # float fields of these may be extra search dimensions


def searchable_keys() -> list[str]:
    keys = []
    for section in SEARCHABLE_SECTIONS:
        hints, fields = field_hints(SECTIONS[section])
        keys += [f"{section}.{f}" for f in fields if float in (hints[f], *getattr(hints[f], "__args__", ()))]
    return [k for k in keys if k != "optim.lr"]


def build_tune_cfg(values: dict[str, Any]) -> TuneCfg:
    """A validated :class:`TuneCfg` from the composed ``tune`` dict, with one-line errors."""
    hints, fields = field_hints(TuneCfg)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"tune.{key} is not a known key; valid keys: {', '.join('tune.' + f for f in fields)}")
        if key == "search":
            kwargs[key] = _search_dims(value)
        else:
            kwargs[key] = coerce(f"tune.{key}", value, hints[key])
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
        low = coerce(f"tune.search.{key}.low", spec["low"], float)
        high = coerce(f"tune.search.{key}.high", spec["high"], float)
        log_ = coerce(f"tune.search.{key}.log", spec.get("log", False), bool)
        check(f"tune.search.{key}.high", high, math.isfinite(low) and math.isfinite(high) and low < high,
               f"a finite number > tune.search.{key}.low ({low:g})")
        check(f"tune.search.{key}.low", low, not log_ or low > 0, "> 0 with log: true")
        dims.append(SearchDim(key, low, high, log_))
    return dims


def compose(overrides: list[str]) -> tuple[dict[str, Any], RunCfg, TuneCfg]:
    """Compose ``gradsweep/conf/`` plus the ``tune`` group; return the plain config, the base run and the tune settings."""
    from hydra.errors import HydraException

    from gradsweep.hydra_shim import parse_overrides
    from gradsweep.sweep.preflight import check_overrides, compose_values, one_line

    flags = [a for a in overrides if a.startswith("-")]
    if flags:
        rest = " ".join(a for a in overrides if not a.startswith("-"))
        raise ConfigError(f"{flags[0]}: gradsweep.tune takes no -m or other flags: it is one search that sweeps its own "
                          f"lr (tune.lr_min..tune.lr_max); give one value per key: python -m gradsweep.tune {rest}".rstrip())
    try:
        parsed = parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(one_line(e)) from None
    for o in parsed:
        if o.is_sweep_override():
            raise ConfigError(f"{o.input_line} is a sweep; gradsweep.tune takes one value per key "
                              "(sweep with python -m gradsweep -m)")
        if o.key_or_group.startswith("hydra"):
            raise ConfigError(f"{o.input_line}: hydra.* keys do not apply to gradsweep.tune (use tune.out_dir)")
        section, _, key = o.key_or_group.partition(".")
        fields = field_hints(TuneCfg)[1]
        if section == TUNE_DIR and key.split(".")[0] not in fields:
            raise ConfigError(f"{o.key_or_group} is not a known key; valid keys: {', '.join('tune.' + f for f in fields)}")
    run_overrides = [o.input_line for o in parsed if o.key_or_group.split(".")[0] != TUNE_DIR]
    check_overrides(run_overrides)
    register()  # the tune group's base
    values = compose_values([f"+{TUNE_DIR}=default", *overrides])
    tune = build_tune_cfg(values.pop(TUNE_DIR))
    base = bound_run_cfg(values)
    for dim in tune.search:  # every bound must make a valid run
        for bound in (dim.low, dim.high):
            trial_values(values, tune.lr_range()[0], {dim.key: bound}, check=True)
    return values, base, tune


def tune_study(values: dict[str, Any], base: RunCfg, tune: TuneCfg, quiet: bool = False) -> dict[str, Any]:
    """Run ``tune.n_trials`` more trials of the study in batches; write and return the summary."""
    import optuna

    from gradsweep.progress import bar as progress_bar

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = tune.study_name or default_study_name(base)
    out_dir = Path(tune.out_dir) if tune.out_dir else Path("outputs") / TUNE_DIR / name
    tdir = out_dir / TUNE_DIR
    study, where = open_study(tune, base, name, out_dir)
    tdir.mkdir(parents=True, exist_ok=True)
    tune, prior = _with_prior(study, base, tune, not (quiet or base.quiet))
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
                set_system_attr(study, trials[-1], WORKER_ATTR, me)
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
                            fail_and_requeue(study, trial, tdir, "interrupted")
                    except Exception:
                        pass
                raise
            done += k
            bar.update(k)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    summary = best_of_study(study, tune, where, out_dir)
    summary["curvature"] = prior
    summary["this_invocation"] = {"trials": tune.n_trials, "batch_size": tune.batch_size, "wall_s": wall}
    summary["failed"] = [{"trial": n, "error": f"{type(e).__name__}: {first_line(e)}"} for n, e in failed]
    write_outputs(study, summary, tdir)
    return summary



def _with_prior(study: Any, base: RunCfg, tune: TuneCfg, say: bool) -> tuple[TuneCfg, dict[str, Any]]:
    """The curvature prior (gradsweep.tune.prior): the TuneCfg with its lr range, what it measured, and, in a new
    study, the first trials queued at multiples of the predicted edge."""
    tune, prior = curvature_prior(base, tune)
    if prior["prior"] == "curvature" and not study.get_trials(deepcopy=False):
        for factor in PRIOR_PROBES[:tune.n_trials]:  # a new study starts from a bracket of the predicted edge
            study.enqueue_trial({"lr": factor * prior["lr_edge_pred"]}, skip_if_exists=True)
    if prior.get("lr_edge_pred") and say:
        lo, hi = tune.lr_range()
        print(f"curvature prior: sharpness at init {prior['sharpness_init']:.4g}, predicted edge "
              f"{prior['lr_edge_pred']:.4g}; searching lr in {lo:.3g} .. {hi:.3g}"
              + ("" if prior["prior"] == "curvature" else " (tune.lr_min / tune.lr_max given)"))
    return tune, prior

def _tell(study: Any, trial: Any, outcome: tuple[float, dict[str, Any]] | Exception) -> None:
    import optuna

    try:
        if isinstance(outcome, Exception):
            trial.set_user_attr("error", f"{type(outcome).__name__}: {first_line(outcome)}")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            return
        value, attrs = outcome
        for key, v in attrs.items():
            trial.set_user_attr(key, v)
        if named_constraints():
            for key, v in zip(CONSTRAINTS, attrs["constraints"]):
                trial.set_constraint(key, v)
        study.tell(trial, value)
    except optuna.exceptions.UpdateFinishedTrialError:
        # Another worker took this one for dead (no heartbeat for tune.stale_after_s) and queued it again:
        # its retry reads the tables written here instead of training them again.
        log.warning(f"trial {trial.number} was failed as stale by another worker meanwhile; its retry reuses "
                    "these tables")


HELP = """usage: python -m gradsweep.tune [overrides]

Search the learning rate that trains fastest without instability, with Optuna; trials are trained in fused
batches. Overrides are the runner's (model.depth=30 init=kaiming ...) plus tune.* (gradsweep/conf/tune/default.yaml):
  tune.n_trials, tune.batch_size, tune.lr_min, tune.lr_max, tune.search, tune.sampler, tune.seed,
  tune.objective, tune.study_name, tune.storage, tune.out_dir, tune.stale_after_s, tune.safety, tune.prior
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
