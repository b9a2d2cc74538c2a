"""The unit of work: a group of runs that share an architecture, trained as one stacked model and written once.

The runner (``gradsweep.sweep.launch``, in this process or as submitted jobs through ``gradsweep.sweep.submit``) and the
tuner (``gradsweep.tune``) both :func:`plan` their runs into :class:`GroupJob` s and hand each to
:func:`run_group`: training (``gradsweep.engine.train``), its tables (``gradsweep.results.tables``) and the group's files
(``gradsweep.results.store``).

Imports of torch and pandas are inside the functions: Hydra's plugin discovery imports :func:`fusable` from here.
Named ``group``, not ``groups``: under an editable install, a sweep directory named ``gradsweep`` in the working
directory (whose ``groups/`` holds the tables) would otherwise shadow this module.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gradsweep.config.sections import RunCfg

_BYTES_PER_VALUE = 8 * 3  # float64, held about three times over while a group's tables are built
RESULT_KEYS = ("run_id", "verdict", "final_loss", "grad_ratio_log10", "diverged_step")  # a job's return value


def fusable(task_function: Any) -> bool:
    """Only gradsweep's own task is trained fused; any other task runs job by job."""
    return bool(getattr(task_function, "gradsweep_fusable", False))


@dataclass
class GroupJob:
    """One group to train and write: what a submitted job receives (pickled), and what the tuner builds."""

    cfgs: list[RunCfg]
    """The runs, sharing ``train.group_key``."""
    meta: list[dict[str, Any]]
    """Per run: ``job_num`` and ``override_dirname`` for its runs-table row."""
    run_dirs: list[Path]
    """Per run: its job directory (Hydra's ``<sweep_dir>/<subdir>``)."""
    job_files: list[tuple[dict[str, Any], list[str]]]
    """Per run: the config and the overrides written to its job directory's ``output_subdir``."""
    output_subdir: str | None
    """Hydra's ``hydra.output_subdir`` (``.hydra``); None: no job files."""
    group_dir: Path
    """Where the group's runs and steps tables go (``<sweep_dir>/groups/<first job>``)."""


@dataclass
class GroupResult:
    """What :func:`run_group` returns: per run its runs-table record and its failure (None if written)."""

    records: list[dict[str, Any]]
    failures: list[Exception | None]
    line: str
    """One log line: runs, architecture, device, speed and times."""

    @classmethod
    def failed(cls, n: int, error: Exception) -> GroupResult:
        """A group none of whose runs were written (its job died)."""
        return cls([{} for _ in range(n)], [error] * n, f"{n} runs FAILED: {error}")


@dataclass
class GroupLimits:
    """How large one group may grow: the fused launcher's ``memory_gb`` and ``max_group_runs``."""

    memory_gb: float = math.inf
    max_runs: int | None = None


def runs_per_group(cfg: RunCfg, memory_gb: float, cap: int | None, free_bytes: int | None = None) -> int:
    """How many runs of this architecture to train as one stacked model.

    At most what ``memory_gb`` of recorded statistics holds on the host, what ``DEVICE_MEMORY_SHARE`` of
    ``free_bytes`` (the device's free memory, on a GPU) holds while training, and ``cap``.
    """
    from gradsweep.engine.device import DEVICE_MEMORY_SHARE, device_bytes_per_run
    from gradsweep.engine.nets import layer_count
    from gradsweep.engine.records import LAYER_STATS

    logged = -(-cfg.train.steps // cfg.train.log_every) + 1
    n_layers = layer_count(cfg.model, cfg.data.in_dim, cfg.data.out_dim)
    per_run = logged * n_layers * (len(LAYER_STATS) + 7) * _BYTES_PER_VALUE
    fit = max(1, int(memory_gb * 2**30 // per_run)) if math.isfinite(memory_gb) else 2**62
    if free_bytes is not None:
        fit = min(fit, max(1, int(free_bytes * DEVICE_MEMORY_SHARE // device_bytes_per_run(cfg))))
    return min(fit, cap) if cap else fit


def plan(cfgs: list[RunCfg], members: list[int], limits: GroupLimits | None = None) -> list[list[int]]:
    """The ``members`` (indices into ``cfgs``) split into groups: one architecture each (``train.group_key``),
    in order of first appearance, each at most as large as ``limits`` and the device's free memory allow."""
    from gradsweep.engine.device import free_device_bytes
    from gradsweep.engine.train import group_key

    limits = limits or GroupLimits()
    by_key: dict[tuple, list[int]] = {}
    for i in members:
        by_key.setdefault(group_key(cfgs[i]), []).append(i)
    chunks = []
    for group in by_key.values():
        first = cfgs[group[0]]
        size = runs_per_group(first, limits.memory_gb, limits.max_runs, free_device_bytes(first.device))
        chunks += [group[k:k + size] for k in range(0, len(group), size)]
    return chunks


def run_group(job: GroupJob) -> GroupResult:
    """Train one group and write its tables and job directories: the unit of work, in this process or in a
    submitted job. A run whose job directory cannot be written fails alone; the group's tables then hold the
    others. A failure to write the group's tables fails every run of it."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from gradsweep.engine.train import train_group
    from gradsweep.results.store import write_group, write_job_dirs
    from gradsweep.results.tables import build_tables

    cfgs, dirs = job.cfgs, job.run_dirs
    trace = train_group(cfgs)
    t_written = time.perf_counter()
    runs, steps = build_tables(cfgs, trace, job.meta, arrow=True)
    with ThreadPoolExecutor(1) as pool:  # the group's tables and the runs' job directories, side by side
        tables = pool.submit(write_group, job.group_dir, dirs, runs, steps)
        failures = write_job_dirs(dirs, job.job_files, job.output_subdir)
        group_error = tables.exception()
    ok = [f is None for f in failures]
    if group_error is None and not all(ok):  # the tables hold only runs whose directory exists
        ok_ids = pa.array(runs["run_id"][ok].tolist(), pa.string())
        try:
            write_group(job.group_dir, [d for d, k in zip(dirs, ok) if k], runs[ok],
                        steps.filter(pc.is_in(steps.column("run_id"), value_set=ok_ids)))
        except Exception as e:
            group_error = e
    if group_error is not None:  # the group's tables are every run's: each run fails with them
        failures = [f or group_error for f in failures]
    m = cfgs[0].model
    n = len(cfgs)
    line = (f"{n} run{'s' if n != 1 else ''} ({_arch(m)}), {trace.device}, "
            f"{trace.engine}, "
            f"{n * cfgs[0].train.steps / trace.wall_s:,.0f} run-steps/s; "
            f"trained in {trace.wall_s:.1f} s, written in {time.perf_counter() - t_written:.1f} s")
    return GroupResult(runs.to_dict("records"), failures, line)


def job_result(row: Any) -> dict[str, Any]:
    """A job's return value (its ``JobReturn.return_value``): the headline of its runs-table row."""
    import pandas as pd

    return {k: (None if k == "diverged_step" and row[k] is pd.NA else row[k]) for k in RESULT_KEYS}


def job_return(overrides: list[str], cwd: str, task_name: str, record: dict[str, Any] | None,
               failure: Exception | None) -> Any:
    """Hydra's ``JobReturn`` of one run: COMPLETED with :func:`job_result`, or FAILED with its exception."""
    from hydra.core.utils import JobReturn, JobStatus

    ret = JobReturn(overrides=overrides, working_dir=cwd, task_name=task_name)
    if failure is None:
        ret.status, ret.return_value = JobStatus.COMPLETED, job_result(record)
    else:
        ret.status, ret.return_value = JobStatus.FAILED, failure
    return ret


def _arch(m: Any) -> str:
    """A group's net for its log line: the MLP's or a built-in module's keys, or a custom module and its arguments."""
    if m.name == "custom":
        return f"{m.net['_target_']}: " + (", ".join(f"{k}={v}" for k, v in m.net.items() if k != "_target_")
                                           or "no arguments")
    keys = (f"depth {m.depth}, width {m.width}, {m.activation}" + (", residual" if m.residual else "")
            + (f", {m.norm}" if m.norm != "none" else ""))
    return keys if m.name == "mlp" else f"{m.name}: {keys}"
