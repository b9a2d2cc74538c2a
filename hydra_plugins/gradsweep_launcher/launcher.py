"""The fused launcher: thin here, the work in ``gradsweep.launcher`` (imported when a sweep launches)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.gradsweep_launcher import config as _config  # noqa: F401  (registers the configs)


class FusedLauncher(Launcher):
    def __init__(self, max_group_runs: int | None = None, memory_gb: float = 1.0) -> None:
        self.max_group_runs = max_group_runs
        self.memory_gb = memory_gb
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from gradsweep.launcher import launch

        return launch(self, job_overrides, initial_job_idx)

    def __repr__(self) -> str:
        return f"FusedLauncher(max_group_runs={self.max_group_runs}, memory_gb={self.memory_gb})"


def fusable(task_function: Any) -> bool:
    """Only gradsweep's own task is trained fused; any other task runs job by job."""
    return bool(getattr(task_function, "gradsweep_fusable", False))
