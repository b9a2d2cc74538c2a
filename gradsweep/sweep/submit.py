"""Groups as submitit jobs (``hydra/launcher=gradsweep_submitit_local`` or ``_slurm``): submitting them, waiting
for them, and adopting the jobs an earlier start of the same sweep submitted that still run."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradsweep.config.identity import config_hash
from gradsweep.errors import ResumeError, SetupError, first_line
from gradsweep.sweep.group import GroupJob, GroupResult, run_group

log = logging.getLogger("gradsweep.sweep.launch")

ACTIVE_SLURM_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED"}


def job_threads(default: int | None) -> int | None:
    """Threads for torch in a submitted job: the CPUs SLURM gave it, else ``default``."""
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return default


def run_submitted(threads: int | None, job: GroupJob) -> GroupResult:
    """``groups.run_group`` in a submitted job, with torch's threads limited to the job's CPUs: jobs sharing a node
    would otherwise each start a thread per core, and one starves (scripts/bench_threads.py shows it)."""
    import torch

    from gradsweep.engine.device import MAX_THREADS_ENV

    threads = job_threads(threads)
    if threads:
        os.environ[MAX_THREADS_ENV] = str(threads)  # train_group's thread choice stays within the job's CPUs
        torch.set_num_threads(threads)
    return run_group(job)


def _import_submitit(launcher: Any) -> Any:
    try:
        import submitit
    except ImportError:
        raise SetupError(f"hydra.launcher.executor={launcher.executor} needs submitit "
                         "(pip install 'gradsweep[cluster]')") from None
    return submitit


def _submitit_folder(launcher: Any, sweep_dir: Path) -> str:
    return str(launcher.submitit_folder).replace("${hydra.sweep.dir}", str(sweep_dir))


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


@dataclass
class InFlight:
    """A job an earlier start of this sweep submitted, still queued or running: the submitit job and the group
    it trains."""

    job: Any
    group: GroupJob


def inflight_jobs(launcher: Any, sweep_dir: Path) -> list[InFlight]:
    """Jobs an earlier start of this sweep submitted that are still queued or running (the command that
    submitted them was killed, e.g. with its login session; submitted jobs outlive it, local ones too), with the
    group each trains. A rerun waits for these instead of submitting their groups a second time."""
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
        try:
            submission = submitit.core.utils.DelayedSubmission.load(root / job_id / f"{job_id}_submitted.pkl")
        except Exception as e:  # pickled by another version of gradsweep: its group cannot be read here
            log.warning(f"submitit job {job_id} of an earlier start cannot be read ({first_line(e)}); not waited for")
            continue
        group = submission.args[1] if len(submission.args) == 2 else None
        if getattr(submission.function, "__name__", "") != run_submitted.__name__ or not isinstance(group, GroupJob):
            continue
        job = (submitit.SlurmJob(folder=folder, job_id=job_id) if launcher.executor == "slurm"
               else _LocalOrphan(submitit, folder, job_id, marker))
        jobs.append(InFlight(job, group))
    return jobs


def submit(launcher: Any, sweep_dir: Path, groups: list[GroupJob], adopted: Sequence[InFlight] = ()) -> list[GroupResult]:
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
    threads = launcher.cpus_per_task or max(1, (os.cpu_count() or 1) // max(1, len(groups)))
    submitted = [ex.submit(run_submitted, threads, group) for group in groups]
    if submitted:
        log.info(f"Submitted {len(submitted)} group(s) to submitit ({launcher.executor}), logs in {folder}")
    results = []
    sizes = [len(a.group.cfgs) for a in adopted] + [len(group.cfgs) for group in groups]
    for job, n in zip([a.job for a in adopted] + submitted, sizes):
        try:
            results.append(job.result())
        except Exception as e:  # the job died (killed, timed out, out of memory): its runs fail, not the sweep
            results.append(GroupResult.failed(n, _job_error(job, e)))
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


def adopt(inflight: list[InFlight], todo: list[int], cfgs: list, dirs: list[Path],
          sweep_dir: Path) -> list[tuple[InFlight, list[int]]]:
    """The in-flight jobs whose runs this sweep still needs, with those runs' job indices; a job training
    runs this sweep would train differently is refused in one line."""
    index_of = {Path(os.path.abspath(dirs[i])): i for i in todo}
    adopted = []
    for flight in inflight:
        members = [index_of.get(Path(os.path.abspath(d))) for d in flight.group.run_dirs]
        if all(m is None for m in members):
            continue  # its group completed since (or is not this sweep's): nothing to wait for
        if any(m is None or config_hash(cfgs[m]) != config_hash(c) for m, c in zip(members, flight.group.cfgs)):
            raise ResumeError(f"submitit job {flight.job.job_id}, submitted by an earlier start, still trains runs in "
                              f"{sweep_dir} of another configuration; wait for it to end or scancel it, or use a new "
                              "hydra.sweep.dir")
        adopted.append((flight, members))
    return adopted
