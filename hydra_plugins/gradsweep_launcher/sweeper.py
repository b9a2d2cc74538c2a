"""Hydra's basic sweeper, minus its second composition of every job when the fused launcher runs them."""

from __future__ import annotations

from collections.abc import Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

from hydra_plugins.gradsweep_launcher import config as _config  # noqa: F401  (registers the configs)
from hydra_plugins.gradsweep_launcher.launcher import FusedLauncher, fusable


class GradsweepSweeper(BasicSweeper):
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        # BasicSweeper composes every job (~100 ms each) only to fail early on a bad one. The fused
        # launcher composes and checks every job of a batch before it trains any, so that is done
        # there, once; for any other launcher or task, Hydra's own check stands.
        if isinstance(self.launcher, FusedLauncher) and fusable(self.launcher.task_function):
            return
        super().validate_batch_is_legal(batch)
