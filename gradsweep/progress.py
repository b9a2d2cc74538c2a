"""A tqdm bar over the runs of a multirun, as a Hydra callback (configured in conf/config.yaml)."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from tqdm.auto import tqdm


def count_jobs(overrides: list[str]) -> int | None:
    """How many jobs the basic sweeper makes of these command-line overrides (None if it cannot tell)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
    except Exception:  # e.g. interval() sweeps, which only a sampling sweeper expands
        return None


class SweepProgress(Callback):
    """One bar for the whole sweep, advanced as each job ends; silent with ``quiet=true``."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        total = count_jobs(config.hydra.overrides.task)
        self.bar = tqdm(total=total, desc="sweep", unit="run", disable=bool(config.get("quiet", False)))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
