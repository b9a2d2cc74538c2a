"""The fused launcher's Hydra side: compose every job, resume what an earlier start completed, plan the runs
into groups of one architecture (``gradsweep.sweep.group``), train them here or as submitted jobs
(``gradsweep.sweep.submit``), and answer Hydra with one ``JobReturn`` per job.

Each run still gets what a Hydra job leaves behind: its own directory (``hydra.sweep.subdir``) with
``.hydra/config.yaml`` and ``.hydra/overrides.yaml``, its job number, ``override_dirname`` and a ``JobReturn``;
its rows sit in its group's tables under ``<sweep_dir>/groups/``. Tasks other than gradsweep's go to Hydra's
own basic launcher. Errors are typed (``gradsweep.errors``); the plugin's ``launch`` reports them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, configure_log, setup_globals
from omegaconf import OmegaConf, open_dict

from gradsweep.errors import ResumeError
from gradsweep.sweep.group import GroupJob, GroupLimits, GroupResult, fusable, job_return, plan, run_group

log = logging.getLogger("gradsweep.sweep.launch")


def run_one_by_one(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """Hydra's own basic launcher, for task functions that are not gradsweep's."""
    from gradsweep.hydra_shim import basic_launcher

    basic = basic_launcher(launcher.hydra_context, launcher.task_function, launcher.config)
    return basic.launch(job_overrides, initial_job_idx)


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


def launch(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[JobReturn]:
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
    from gradsweep.sweep.submit import adopt, inflight_jobs, submit

    t0 = time.perf_counter()
    sweep = _compose(launcher, job_overrides, initial_job_idx, sweep_dir)
    compose_s = time.perf_counter() - t0
    executor = getattr(launcher, "executor", None)
    inflight = inflight_jobs(launcher, sweep_dir) if executor else []
    todo = _resume(sweep, frozenset(Path(p) for f in inflight for p in (f.group.group_dir, *f.group.run_dirs)))
    adopted = adopt(inflight, todo, sweep.cfgs, [sweep_dir / d for d in sweep.rel_dirs], sweep_dir)
    if adopted:
        taken = {i for _, members in adopted for i in members}
        todo = [i for i in todo if i not in taken]
        log.info(f"Waiting for {len(adopted)} {'SLURM' if executor == 'slurm' else 'local submitit'} job(s) an "
                 "earlier start submitted, still queued or running "
                 f"({', '.join(f.job.job_id for f, _ in adopted)}): {len(taken)} runs, not submitted again")
    chunks = plan(sweep.cfgs, todo, GroupLimits(launcher.memory_gb, launcher.max_group_runs))
    log.info(f"Launching {len(todo)} job{'s' if len(todo) != 1 else ''} fused: {len(chunks)} group(s) of one architecture each "
             f"(configs composed in {compose_s:.2f} s, {sweep.n_hydra} by Hydra)")
    group_jobs = [sweep.group_job(chunk) for chunk in chunks]
    if executor:  # each group one submitted job (submitit: a local process or a SLURM job), all in flight at once
        results: Iterable[GroupResult] = submit(launcher, sweep_dir, group_jobs, [f for f, _ in adopted])
        chunks = [members for _, members in adopted] + chunks
    else:
        results = (run_group(job) for job in group_jobs)
    for g, (chunk, result) in enumerate(zip(chunks, results)):
        log.info(f"group {g + 1}/{len(chunks)}: {result.line}")
        for row, i in enumerate(chunk):
            sweep.finish(i, result.records[row], result.failures[row])
    return sweep.returns  # type: ignore[return-value]


@dataclass
class _Sweep:
    """One batch of a fused sweep: its composed jobs, their configs and directories, and the returns so far."""

    launcher: Any
    jobs: list[Any]
    cfgs: list[Any]
    rel_dirs: list[str]
    sweep_dir: Path
    initial_job_idx: int
    n_hydra: int
    """How many jobs Hydra composed itself (the others: gradsweep.sweep.compose's fast path)."""
    returns: list[JobReturn | None] = field(default_factory=list)
    cwd: str = field(default_factory=os.getcwd)

    def finish(self, i: int, record: Any, failure: Any) -> None:
        """Job ``i``'s JobReturn, handed to Hydra's callbacks as a job of the basic launcher's would be."""
        config = self.launcher.config
        ret = job_return(self.jobs[i].overrides, self.cwd, str(config.hydra.job.name), record, failure)
        self.returns[i] = ret
        self.launcher.hydra_context.callbacks.on_job_end(config=config, job_return=ret)

    def group_job(self, chunk: list[int]) -> GroupJob:
        from gradsweep.results.schema import GROUPS_DIR

        jobs = self.jobs
        return GroupJob(cfgs=[self.cfgs[i] for i in chunk],
                        meta=[{"job_num": self.initial_job_idx + i, "override_dirname": jobs[i].override_dirname}
                              for i in chunk],
                        run_dirs=[self.sweep_dir / self.rel_dirs[i] for i in chunk],
                        job_files=[(jobs[i].unresolved, jobs[i].overrides) for i in chunk],
                        output_subdir=self.launcher.config.hydra.output_subdir,
                        group_dir=self.sweep_dir / GROUPS_DIR / str(self.initial_job_idx + chunk[0]))


def _compose(launcher: Any, job_overrides: Sequence[Sequence[str]], initial_job_idx: int, sweep_dir: Path) -> _Sweep:
    """Every job composed and checked before any trains: one bad value (ConfigError) fails the sweep with nothing
    written."""
    from gradsweep.engine.arrays import bound_run_cfg
    from gradsweep.engine.device import resolve_device
    from gradsweep.engine.nets import check_batch
    from gradsweep.sweep.compose import SweepComposer

    config = launcher.config
    composer = SweepComposer(launcher.hydra_context.config_loader, config)
    jobs = [composer.compose(list(ov), initial_job_idx + i) for i, ov in enumerate(job_overrides)]
    cfgs = [bound_run_cfg(job.task) for job in jobs]
    for device in {c.device for c in cfgs}:
        resolve_device(device)
    for c in cfgs:  # a module that cannot train on the one sample a step would give it
        check_batch(c.model, c.data.in_dim, c.data.out_dim, c.train.batch_size)
    subdir_template = OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"]  # as written, unresolved
    rel_dirs = [_subdir(launcher, subdir_template, initial_job_idx + i, jobs[i].override_dirname, job_overrides[i])
                for i in range(len(jobs))]
    return _Sweep(launcher, jobs, cfgs, rel_dirs, sweep_dir, initial_job_idx, composer.n_hydra, [None] * len(jobs))


def _resume(sweep: _Sweep, busy: frozenset[Path]) -> list[int]:
    """The jobs still to train. The complete ones (same directory, same run_id) are returned to Hydra as they are,
    their job files rewritten where a kill came before them; a directory holding another configuration's run is a
    ResumeError. ``busy``: directories an in-flight submitted job is writing."""
    from gradsweep.config.identity import config_hash
    from gradsweep.results.store import completed_runs, write_job_files

    done = completed_runs(sweep.sweep_dir, busy)
    output_subdir = sweep.launcher.config.hydra.output_subdir
    prior = {i: done.get(Path(d).as_posix()) for i, d in enumerate(sweep.rel_dirs)}
    for i, cfg in enumerate(sweep.cfgs):  # every directory checked before any job is returned
        if prior[i] is not None and prior[i]["run_id"] != (run_id := config_hash(cfg)):
            raise ResumeError(f"{sweep.sweep_dir / sweep.rel_dirs[i]} holds a run of another configuration (run_id "
                              f"{prior[i]['run_id']}, this sweep's job {sweep.initial_job_idx + i} is {run_id}); "
                              "rerun with the same command to resume, or use a new hydra.sweep.dir")
    todo = [i for i in prior if prior[i] is None]
    for i in (i for i in prior if prior[i] is not None):
        job_dir = sweep.sweep_dir / sweep.rel_dirs[i]
        if output_subdir and not (job_dir / str(output_subdir) / "config.yaml").exists():  # killed before its files
            write_job_files(job_dir, sweep.jobs[i].unresolved, sweep.jobs[i].overrides, output_subdir)
        sweep.finish(i, prior[i], None)  # resumed: complete already, not trained again
    if len(todo) < len(sweep.jobs):
        log.info(f"Resuming in {sweep.sweep_dir}: {len(sweep.jobs) - len(todo)} of {len(sweep.jobs)} runs already "
                 f"complete (same configuration), training the other {len(todo)}")
    return todo
