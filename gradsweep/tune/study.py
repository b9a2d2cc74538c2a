"""The study: its storage (an Optuna journal file, or any SQLAlchemy URL), its sampler, its constraints, and the
few writes Optuna has no public API for."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from gradsweep.config.identity import config_hash
from gradsweep.config.sections import RunCfg
from gradsweep.errors import ConfigError, first_line
from gradsweep.results.schema import TUNE_DIR
from gradsweep.tune.config import SAMPLERS, TuneCfg

JOURNAL_FILE = "study.journal"
TABLE_CREATION_TRIES = 5
BASE_ATTR = "gradsweep_base"  # study user attribute: hash of the configuration the study was created for
# Trial system attributes: which process trains it, when it last said so, and the group directory its tables go to.
WORKER_ATTR, BEAT_ATTR, GROUP_ATTR = "gradsweep_worker", "gradsweep_heartbeat", "gradsweep_group"
FAILED_ATTR = "gradsweep_failed"  # trial system attribute: why a worker failed it as stale


def default_study_name(base: RunCfg) -> str:
    m = base.model
    if m.name == "custom":  # the module's name (its target's last part) in place of the MLP's keys
        arch = m.net["_target_"].rsplit(".", 1)[-1]
    else:
        arch = f"{m.activation}-d{m.depth}-w{m.width}" if m.name == "mlp" else f"{m.name}-{m.activation}-d{m.depth}-w{m.width}"
    return f"lr-{arch}-{base.init.name}-{base.optim.name}-{config_hash(base)[:8]}"


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


def named_constraints() -> bool:
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


SEED_STRIDE = 1_000_003  # a prime: workers with tune.seed a and b collide only if |a - b| is a multiple of it


def sampler_seed(seed: int, n_before: int) -> int:
    """The sampler's seed for an invocation that finds ``n_before`` trials in the study: ``tune.seed`` on a new study
    (reproducible), moved on by a stride per earlier trial, so a rerun proposes new points. Two workers started
    together with tune.seed 0 and 1 must not get the same seed (0 + 1 and 1 + 0 did: their random start proposed
    the same learning rates, so a run was shared by two trials); with a stride they do not."""
    return (seed + SEED_STRIDE * n_before) % 2**32


def make_sampler(tune: TuneCfg, seed: int) -> Any:
    """The sampler by name; on Optuna 4 the constraints reach it through ``constraints_func``."""
    import optuna

    c = None if named_constraints() else constraints_of
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


# each holds when its value is <= 0: one per verdict that is not healthy (gradsweep.results.verdicts), and the loss fell
CONSTRAINTS = ("diverged", "dead", "vanishing", "exploding", "stalled", "loss_increased")


def constraints_of(trial: Any) -> list[float]:
    """Optuna 4's ``constraints_func``: the values recorded with the trial, in ``CONSTRAINTS`` order."""
    return list(trial.user_attrs.get("constraints", [1.0] * len(CONSTRAINTS)))


def open_study(tune: TuneCfg, base: RunCfg, name: str, out_dir: Path) -> tuple[Any, str]:
    """Load the study ``name`` (continuing it) or create it, checked to be for ``base``'s configuration and a
    minimisation; and its storage described (a path, or a URL without its password)."""
    import optuna

    storage, where = open_storage(tune, out_dir)
    base_hash = config_hash(base)
    try:
        existing = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        existing = None
    except Exception as e:  # a corrupt journal, a database that is not Optuna's
        raise ConfigError(f"tune.storage={where!r} cannot be read: {first_line(e)}") from None
    if existing is not None:
        made_for = existing.user_attrs.get(BASE_ATTR)
        if made_for is not None and made_for != base_hash:
            raise ConfigError(f"tune.study_name={name!r} is not valid here: that study in {where} was created for "
                              "another configuration; choose another tune.study_name or tune.storage")
        if existing.direction != optuna.study.StudyDirection.MINIMIZE:
            raise ConfigError(f"tune.study_name={name!r} is not valid here: that study is not a minimisation")
    n_before = len(existing.trials) if existing is not None else 0
    sampler = make_sampler(tune, sampler_seed(tune.seed, n_before))
    try:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True,
                                    sampler=sampler)
    except Exception as e:  # e.g. a journal whose lines are not Optuna's
        raise ConfigError(f"tune.storage={where!r} cannot be read: {first_line(e)}") from None
    if existing is None:
        study.set_user_attr(BASE_ATTR, base_hash)
    return study, where


# Private Optuna API, here only. Optuna 3 deprecated and Optuna 4 removed Trial.set_system_attr, and no public call
# writes a system attribute (kept out of the user attributes a dashboard shows), reads a trial by id, or fails a
# RUNNING trial another process asked (Study.tell takes only this process's trials, and raises where another
# worker got there first; set_trial_state_values says so with its return value). RetryFailedTrialCallback, Optuna's
# own way to retry a trial, uses these same storage calls.


def set_system_attr(study: Any, trial: Any, key: str, value: Any) -> None:
    """Set a system attribute of ``trial`` (a Trial or FrozenTrial of ``study``)."""
    study._storage.set_trial_system_attr(trial._trial_id, key, value)  # private: see the note above


def fail_running(study: Any, trial: Any) -> bool:
    """Mark a RUNNING trial FAIL; False when it finished meanwhile (another worker failed or told it)."""
    import optuna

    return study._storage.set_trial_state_values(trial._trial_id, state=optuna.trial.TrialState.FAIL)  # private


def stored_trial(study: Any, trial: Any) -> Any:
    """The trial as stored now (a FrozenTrial)."""
    return study._storage.get_trial(trial._trial_id)  # private: see the note above
