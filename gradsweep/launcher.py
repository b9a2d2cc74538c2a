"""The fused launcher's work: compose every job, group runs by architecture, train each group stacked.

Each run still gets what a Hydra job leaves behind: its own directory (``hydra.sweep.subdir``) with
``.hydra/config.yaml`` and ``.hydra/overrides.yaml``, its job number, ``override_dirname`` and a ``JobReturn``;
its rows sit in its group's tables under ``<sweep_dir>/groups/``. Tasks other than gradsweep's go to Hydra's
own basic launcher.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from hydra.core.utils import JobReturn, JobStatus, configure_log, setup_globals
from omegaconf import open_dict

log = logging.getLogger("gradsweep.launcher")

_BYTES_PER_VALUE = 8 * 3  # float64, held about three times over while a group's tables are built


def run_one_by_one(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """Hydra's own basic launcher, for task functions that are not gradsweep's."""
    from hydra._internal.core_plugins.basic_launcher import BasicLauncher

    basic = BasicLauncher()
    basic.setup(hydra_context=launcher.hydra_context, task_function=launcher.task_function, config=launcher.config)
    return basic.launch(job_overrides, initial_job_idx)


def device_bytes_per_run(cfg: Any) -> int:
    """An upper estimate of the device memory one run of a group takes while it trains.

    Parameters and everything of their size (gradient, clipped gradient, update, optimiser state, the
    statistics' terms: 14 copies), the forward pass kept for backward and its gradients (6 tensors of
    batch x width per block), and the statistics of the steps held on the device between host copies.
    """
    from gradsweep.config import linear_dims
    from gradsweep.data import data_shape
    from gradsweep.model import layers
    from gradsweep.schema import LAYER_STATS
    from gradsweep.train import HOST_COPY_EVERY

    n, in_dim, out_dim = data_shape(cfg.data)
    dims = linear_dims(cfg.model, in_dim, out_dim)
    n_params = sum(i * o + o for i, o in dims) + 3 * cfg.model.depth * cfg.model.width
    batch = min(cfg.train.batch_size or n, n)
    values = 14 * n_params + 6 * batch * sum(o for _, o in dims) * (2 if cfg.model.norm != "none" else 1)
    values += HOST_COPY_EVERY * (len(layers(cfg.model)) * len(LAYER_STATS) + 3)
    return values * (8 if cfg.train.dtype == "float64" else 4)


DEVICE_MEMORY_SHARE = 0.8  # of the free device memory, what one group may take


def free_device_bytes(device: str) -> int | None:
    """Free memory of the CUDA device a run config resolves to; None on the CPU."""
    import torch

    from gradsweep.train import resolve_device

    dev = resolve_device(device)
    return torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None


def runs_per_group(cfg: Any, memory_gb: float, cap: int | None, free_bytes: int | None = None) -> int:
    """How many runs of this architecture to train as one stacked model.

    At most what ``memory_gb`` of recorded statistics holds on the host, what ``DEVICE_MEMORY_SHARE`` of
    ``free_bytes`` (the device's free memory, on a GPU) holds while training, and ``cap``.
    """
    from gradsweep.model import layers
    from gradsweep.schema import LAYER_STATS

    logged = -(-cfg.train.steps // cfg.train.log_every) + 1
    per_run = logged * len(layers(cfg.model)) * (len(LAYER_STATS) + 7) * _BYTES_PER_VALUE
    fit = max(1, int(memory_gb * 2**30 // per_run))
    if free_bytes is not None:
        fit = min(fit, max(1, int(free_bytes * DEVICE_MEMORY_SHARE // device_bytes_per_run(cfg))))
    return min(fit, cap) if cap else fit


def _subdir(launcher: Any, template: Any, idx: int, dirname: str, overrides: Sequence[str]) -> str:
    if template == "${hydra.job.num}":
        return str(idx)
    if template == "${hydra.job.override_dirname}":
        return dirname
    cfg = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, list(overrides))
    with open_dict(cfg):
        cfg.hydra.job.id = idx
        cfg.hydra.job.num = idx
    return str(cfg.hydra.sweep.subdir)


def run_chunk(group_cfgs: list, meta: list[dict], dirs: list[Path], job_files: list[tuple[dict, list[str]]],
              output_subdir: str | None, group_dir: Path) -> tuple[list[dict], list[Exception | None], str]:
    """Train one group and write its tables and job directories: the unit of work, in this process or in a
    submitted job. Returns each run's runs-table record, its failure (None if written) and a log line."""
    from gradsweep.tables import build_tables, write_group, write_job_dirs
    from gradsweep.train import train_group

    trace = train_group(group_cfgs)
    t_written = time.perf_counter()
    runs, steps = build_tables(group_cfgs, trace, meta, arrow=True)
    with ThreadPoolExecutor(1) as pool:  # the group's tables and the runs' job directories, side by side
        tables = pool.submit(write_group, group_dir, dirs, runs, steps)
        failures = write_job_dirs(dirs, job_files, output_subdir)
        group_error = tables.exception()
    ok = [f is None for f in failures]
    if group_error is None and not all(ok):  # the tables hold only runs whose directory exists
        ok_ids = pa.array(runs["run_id"][ok].tolist(), pa.string())
        try:
            write_group(group_dir, [d for d, k in zip(dirs, ok) if k], runs[ok],
                        steps.filter(pc.is_in(steps.column("run_id"), value_set=ok_ids)))
        except Exception as e:
            group_error = e
    if group_error is not None:  # the group's tables are every run's: each run fails with them
        failures = [f or group_error for f in failures]
    m = group_cfgs[0].model
    n = len(group_cfgs)
    line = (f"{n} run{'s' if n != 1 else ''} (depth {m.depth}, width {m.width}, {m.activation}), {trace.device}, "
            f"{len(group_cfgs) * group_cfgs[0].train.steps / trace.wall_s:,.0f} run-steps/s; "
            f"trained in {trace.wall_s:.1f} s, written in {time.perf_counter() - t_written:.1f} s")
    return runs.to_dict("records"), failures, line


def job_threads(default: int | None) -> int | None:
    """Threads for torch in a submitted job: the CPUs SLURM gave it, else ``default``."""
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return default


def run_submitted(threads: int | None, *payload: Any) -> tuple[list[dict], list[Exception | None], str]:
    """``run_chunk`` in a submitted job, with torch's threads limited to the job's CPUs: jobs sharing a node
    would otherwise each start a thread per core, and one starves (seen: 1,245 vs 15 steps/s side by side)."""
    import torch

    threads = job_threads(threads)
    if threads:
        torch.set_num_threads(threads)
    return run_chunk(*payload)


def _import_submitit(launcher: Any) -> Any:
    try:
        import submitit
    except ImportError:
        print(f"gradsweep: error: hydra.launcher.executor={launcher.executor} needs submitit "
              "(pip install 'gradsweep[cluster]')", file=sys.stderr)
        sys.exit(2)
    return submitit


def _submitit_folder(launcher: Any, sweep_dir: Path) -> str:
    return str(launcher.submitit_folder).replace("${hydra.sweep.dir}", str(sweep_dir))


ACTIVE_SLURM_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def process_alive(pid: int, marker: bytes = b"") -> bool:
    """Whether process ``pid`` runs (a zombie its parent has not reaped is gone) and, if ``marker`` is given,
    has it in its command line (a reused pid is another process)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        return not marker or marker in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):
        return True


class _LocalOrphan:
    """A job of submitit's local executor whose submitting process died (the job runs on, reparented): wait for
    its process to end, then read its result like submitit does."""

    def __init__(self, submitit: Any, folder: str, job_id: str, marker: bytes) -> None:
        self.job_id, self._marker = job_id, marker
        self._job = submitit.local.local.LocalJob(folder=folder, job_id=job_id)
        self.paths = self._job.paths

    def result(self) -> Any:
        while process_alive(int(self.job_id), self._marker):
            time.sleep(0.2)
        return self._job.result()

    def get_info(self, mode: str = "force") -> dict[str, str]:
        return {"State": "FINISHED" if self.paths.result_pickle.exists() else "KILLED"}

    @property
    def state(self) -> str:
        return self.get_info()["State"]


def inflight_jobs(launcher: Any, sweep_dir: Path) -> list[tuple[Any, tuple]]:
    """Jobs an earlier start of this sweep submitted that are still queued or running (the command that
    submitted them was killed, e.g. with its login session; submitted jobs outlive it, local ones too): each job
    and the ``run_submitted`` arguments it runs with. A rerun waits for these instead of submitting their
    groups a second time."""
    import subprocess

    folder = _submitit_folder(launcher, sweep_dir)
    root = Path(folder.split("%j")[0]) if "%j" in folder else None
    if root is None or not root.is_dir():
        return []
    ids = sorted((p.name for p in root.iterdir() if p.name.isdigit() and (p / f"{p.name}_submitted.pkl").is_file()
                  and not any(p.glob("*_result.pkl"))), key=int)
    if not ids:
        return []
    marker = str(root).encode()  # a local job's process names its folder on its command line
    if launcher.executor == "slurm":
        try:
            out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(ids)], capture_output=True,
                                 text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning(f"cannot ask SLURM whether the jobs of an earlier start still run ({e}); submitting anew")
            return []
        active = [i for i, state in (line.split()[:2] for line in out.splitlines() if line.strip())
                  if state in ACTIVE_SLURM_STATES and i in ids]
    else:  # local: the job id is its process's
        active = [i for i in ids if process_alive(int(i), marker)]
    submitit = _import_submitit(launcher)
    jobs = []
    for job_id in active:
        submission = submitit.core.utils.DelayedSubmission.load(root / job_id / f"{job_id}_submitted.pkl")
        if getattr(submission.function, "__name__", "") != run_submitted.__name__:
            continue
        job = (submitit.SlurmJob(folder=folder, job_id=job_id) if launcher.executor == "slurm"
               else _LocalOrphan(submitit, folder, job_id, marker))
        jobs.append((job, submission.args))
    return jobs


def _submit(launcher: Any, sweep_dir: Path, payloads: list[tuple], adopted: list[Any] = ()) -> list[tuple]:
    """Run every group as one submitit job (``hydra.launcher.executor``: local or slurm) and wait for them,
    and for the ``adopted`` jobs (groups an earlier start submitted that still run), whose results come first."""
    submitit = _import_submitit(launcher)
    folder = _submitit_folder(launcher, sweep_dir)
    ex = submitit.AutoExecutor(folder=folder, cluster=launcher.executor)
    params = {"timeout_min": launcher.timeout_min, "name": "gradsweep"}
    for key in ("cpus_per_task", "gpus_per_node", "mem_gb", "nodes", "tasks_per_node"):
        if getattr(launcher, key, None) is not None:
            params[key] = getattr(launcher, key)
    if launcher.executor == "slurm":
        for key in ("partition", "qos", "account", "constraint"):
            if getattr(launcher, key, None):
                params[f"slurm_{key}"] = getattr(launcher, key)
        if launcher.additional_parameters:
            params["slurm_additional_parameters"] = dict(launcher.additional_parameters)
    ex.update_parameters(**params)
    # Local jobs share this machine's cores; a SLURM job reads its own CPUs from its environment.
    threads = launcher.cpus_per_task or max(1, (os.cpu_count() or 1) // max(1, len(payloads)))
    submitted = [ex.submit(run_submitted, threads, *payload) for payload in payloads]
    if submitted:
        log.info(f"Submitted {len(submitted)} group(s) to submitit ({launcher.executor}), logs in {folder}")
    results = []
    sizes = [len(job_args[1]) for _, job_args in adopted] + [len(payload[0]) for payload in payloads]
    for job, n in zip([job for job, _ in adopted] + submitted, sizes):
        try:
            results.append(job.result())
        except Exception as e:  # the job died (killed, timed out, out of memory): its runs fail, not the sweep
            err = _job_error(job, e)
            results.append(([{} for _ in range(n)], [err] * n, f"{n} runs FAILED: {err}"))
    return results


def _job_error(job: Any, e: Exception) -> Exception:
    """A one-line account of a submitted job that returned no result: its id, how it ended, its log."""
    import submitit

    if not isinstance(e, submitit.core.utils.UncompletedJobError):
        return e  # the job ran and raised: that exception, as the job raised it
    try:
        state = job.get_info(mode="force").get("State") or job.state
    except Exception:
        state = "UNKNOWN"
    err = RuntimeError(f"submitit job {job.job_id} ended {state} without a result (log: {job.paths.stderr})")
    err.__cause__ = e
    return err


def _adopt(inflight: list[tuple[Any, tuple]], todo: list[int], cfgs: list, dirs: list[Path],
           sweep_dir: Path) -> list[tuple[tuple[Any, tuple], list[int]]]:
    """The in-flight jobs whose runs this sweep still needs, with those runs' job indices; a job training
    runs this sweep would train differently is refused in one line."""
    from gradsweep.config import config_hash

    index_of = {Path(os.path.abspath(dirs[i])): i for i in todo}
    adopted = []
    for job, args in inflight:
        members = [index_of.get(Path(os.path.abspath(d))) for d in args[3]]
        if all(m is None for m in members):
            continue  # its group completed since (or is not this sweep's): nothing to wait for
        if any(m is None or config_hash(cfgs[m]) != config_hash(c) for m, c in zip(members, args[1])):
            print(f"gradsweep: error: submitit job {job.job_id}, submitted by an earlier start, still trains runs in "
                  f"{sweep_dir} of another configuration; wait for it to end or scancel it, or use a new "
                  "hydra.sweep.dir", file=sys.stderr)
            sys.exit(2)
        adopted.append(((job, args), members))
    return adopted


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
    from hydra_plugins.gradsweep_launcher.launcher import fusable

    if not fusable(launcher.task_function):
        return run_one_by_one(launcher, job_overrides, initial_job_idx)
    setup_globals()
    config = launcher.config
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    sweep_dir = Path(str(config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)

    # One log for the whole fused sweep, where Hydra would keep one per job.
    handler = logging.FileHandler(sweep_dir / f"{config.hydra.job.name}.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logging.getLogger("gradsweep").addHandler(handler)
    try:
        return _launch_fused(launcher, job_overrides, initial_job_idx, sweep_dir)
    finally:
        logging.getLogger("gradsweep").removeHandler(handler)
        handler.close()


def _launch_fused(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int,
                  sweep_dir: Path) -> list[JobReturn]:
    from gradsweep.cli import job_result
    from gradsweep.compose import SweepComposer
    from gradsweep.config import ConfigError, build_run_cfg, config_hash
    from gradsweep.tables import GROUPS_DIR, completed_runs, write_job_files
    from gradsweep.train import group_key, resolve_device

    config = launcher.config
    t0 = time.perf_counter()
    composer = SweepComposer(launcher.hydra_context.config_loader, config)
    jobs = [composer.compose(list(ov), initial_job_idx + i) for i, ov in enumerate(job_overrides)]
    try:  # every job checked before any trains: one bad value fails the sweep with nothing written
        cfgs = [build_run_cfg(job.task) for job in jobs]
        for device in {c.device for c in cfgs}:
            resolve_device(device)
    except ConfigError as e:
        print(f"gradsweep: error: {e}", file=sys.stderr)
        sys.exit(2)
    compose_s = time.perf_counter() - t0

    returns: list[JobReturn | None] = [None] * len(jobs)
    subdir_template = launcher.config.hydra.sweep._get_node("subdir")._value()
    output_subdir = config.hydra.output_subdir
    task_name = str(config.hydra.job.name)
    cwd = os.getcwd()
    rel_dirs = [_subdir(launcher, subdir_template, initial_job_idx + i, jobs[i].override_dirname, job_overrides[i])
                for i in range(len(jobs))]
    executor = getattr(launcher, "executor", None)
    inflight = inflight_jobs(launcher, sweep_dir) if executor else []
    busy = frozenset(Path(p) for _, args in inflight for p in (args[6], *args[3]))  # their group and run dirs
    done = completed_runs(sweep_dir, busy)
    todo = []
    for i, cfg in enumerate(cfgs):
        prior = done.get(Path(rel_dirs[i]).as_posix())
        if prior is None:
            todo.append(i)
            continue
        run_id = config_hash(cfg)
        if prior["run_id"] != run_id:
            print(f"gradsweep: error: {sweep_dir / rel_dirs[i]} holds a run of another configuration (run_id "
                  f"{prior['run_id']}, this sweep's job {initial_job_idx + i} is {run_id}); rerun with the same "
                  "command to resume, or use a new hydra.sweep.dir", file=sys.stderr)
            sys.exit(2)
    todo_set = set(todo)
    for i in (i for i in range(len(jobs)) if i not in todo_set):  # resumed: complete already, not trained again
        prior = done[Path(rel_dirs[i]).as_posix()]
        job_dir = sweep_dir / rel_dirs[i]
        if output_subdir and not (job_dir / str(output_subdir) / "config.yaml").exists():  # killed before its files
            write_job_files(job_dir, jobs[i].unresolved, jobs[i].overrides, output_subdir)
        ret = JobReturn(overrides=jobs[i].overrides, working_dir=cwd, task_name=task_name)
        ret.status, ret.return_value = JobStatus.COMPLETED, job_result(prior)
        returns[i] = ret
        launcher.hydra_context.callbacks.on_job_end(config=config, job_return=ret)
    if len(todo) < len(jobs):
        log.info(f"Resuming in {sweep_dir}: {len(jobs) - len(todo)} of {len(jobs)} runs already complete "
                 f"(same configuration), training the other {len(todo)}")

    adopted = _adopt(inflight, todo, cfgs, [sweep_dir / d for d in rel_dirs], sweep_dir)
    if adopted:
        taken = {i for _, members in adopted for i in members}
        todo = [i for i in todo if i not in taken]
        log.info(f"Waiting for {len(adopted)} {'SLURM' if executor == 'slurm' else 'local submitit'} job(s) an "
                 "earlier start submitted, still queued or running "
                 f"({', '.join(job.job_id for (job, _), _ in adopted)}): {len(taken)} runs, not submitted again")
    groups: dict[tuple, list[int]] = {}
    for i in todo:
        groups.setdefault(group_key(cfgs[i]), []).append(i)
    chunks = []
    for members in groups.values():
        first = cfgs[members[0]]
        size = runs_per_group(first, launcher.memory_gb, launcher.max_group_runs, free_device_bytes(first.device))
        chunks += [members[k:k + size] for k in range(0, len(members), size)]
    log.info(f"Launching {len(todo)} job{'s' if len(todo) != 1 else ''} fused: {len(chunks)} group(s) of one architecture each "
             f"(configs composed in {compose_s:.2f} s, {composer.n_hydra} by Hydra)")

    payloads = [([cfgs[i] for i in chunk],
                 [{"job_num": initial_job_idx + i, "override_dirname": jobs[i].override_dirname} for i in chunk],
                 [sweep_dir / rel_dirs[i] for i in chunk],
                 [(jobs[i].unresolved, jobs[i].overrides) for i in chunk],
                 output_subdir, sweep_dir / GROUPS_DIR / str(initial_job_idx + chunk[0])) for chunk in chunks]
    if executor:  # each group one submitted job (submitit: a local process or a SLURM job), all in flight at once
        results = _submit(launcher, sweep_dir, payloads, [(job, args) for (job, args), _ in adopted])
        chunks = [members for _, members in adopted] + chunks
    else:
        results = (run_chunk(*payload) for payload in payloads)
    for g, (chunk, (records, failures, line)) in enumerate(zip(chunks, results)):
        log.info(f"group {g + 1}/{len(chunks)}: {line}")
        for row, i in enumerate(chunk):
            ret = JobReturn(overrides=jobs[i].overrides, working_dir=cwd, task_name=task_name)
            if failures[row] is None:
                ret.status, ret.return_value = JobStatus.COMPLETED, job_result(records[row])
            else:
                ret.status, ret.return_value = JobStatus.FAILED, failures[row]
            returns[i] = ret
            launcher.hydra_context.callbacks.on_job_end(config=config, job_return=ret)
    return returns  # type: ignore[return-value]
