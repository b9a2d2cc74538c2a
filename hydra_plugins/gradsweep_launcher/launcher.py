"""The fused launcher: thin here, the work in ``gradsweep.sweep.launch`` (imported when a sweep launches).

This is where Hydra calls gradsweep's sweep, so it is where gradsweep's typed errors (``gradsweep.errors``) become
one line and an exit status: raised further, Hydra would print them as tracebacks.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.gradsweep_launcher import config as _config  # noqa: F401  (registers the configs)


class FusedLauncher(Launcher):
    def __init__(self, max_group_runs: int | None = None, memory_gb: float = 1.0, executor: str | None = None,
                 **submitit: Any) -> None:
        self.max_group_runs = max_group_runs
        self.memory_gb = memory_gb
        self.executor = executor  # None: groups train in this process; local | slurm: one submitit job per group
        self.submitit_folder = submitit.pop("submitit_folder", ".submitit/%j")
        self.timeout_min = submitit.pop("timeout_min", 60)
        self.additional_parameters = submitit.pop("additional_parameters", {})
        for key, value in submitit.items():  # cpus_per_task, gpus_per_node, mem_gb, nodes, partition, qos, ...
            setattr(self, key, value)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from gradsweep.errors import GradsweepError
        from gradsweep.sweep.launch import launch

        try:
            return launch(self, job_overrides, initial_job_idx)
        except GradsweepError as e:
            print(f"gradsweep: error: {e}", file=sys.stderr, flush=True)
            raise SystemExit(e.exit_code) from None

    def __repr__(self) -> str:
        return (f"FusedLauncher(max_group_runs={self.max_group_runs}, memory_gb={self.memory_gb}, "
                f"executor={self.executor})")

