"""Hydra callbacks (configured in gradsweep/conf/config.yaml): a bar over a sweep's runs, and its summary at the end."""

from __future__ import annotations

import logging
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from tqdm.auto import tqdm

from gradsweep.progress import bar

log = logging.getLogger("gradsweep")

SUMMARY_ROWS = 40  # runs listed one by one in the end-of-sweep summary; more are counted per verdict only


def count_jobs(overrides: list[str]) -> int | None:
    """How many jobs the basic sweeper makes of these command-line overrides (None if it cannot tell)."""
    # Private: Hydra's basic sweeper (only in hydra._internal) is what expands the overrides into jobs; its own
    # split_arguments counts them exactly as the sweep will run them.
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
    except Exception:  # e.g. interval() sweeps, which only a sampling sweeper expands
        return None


def summarize(sweep_dir: str) -> str:
    """A short text summary of a sweep: runs per verdict, then (for small sweeps) one line per run."""
    import pandas as pd

    from gradsweep.store import load_runs
    from gradsweep.verdicts import VERDICTS

    runs = load_runs(sweep_dir, write_index=True)
    counts = runs.verdict.value_counts()
    n = len(runs)
    lines = [f"{n} run{'s' if n != 1 else ''} in {sweep_dir}: " + ", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS)]
    if len(runs) <= SUMMARY_ROWS:
        table = runs[["override_dirname", "verdict", "grad_ratio_log10", "final_loss", "diverged_step"]].copy()
        table["override_dirname"] = table.override_dirname.replace("", "(defaults)")
        with pd.option_context("display.width", 160, "display.max_colwidth", 80, "display.float_format", "{:.3g}".format):
            lines.append(table.rename(columns={"override_dirname": "run"}).to_string(index=False))
    return "\n".join(lines)


class SweepCallback(Callback):
    """One bar for the whole sweep, advanced as each job ends (silent with ``quiet=true``); a summary at the end."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        total = count_jobs(config.hydra.overrides.task)
        self.bar = bar(total=total, desc="sweep", unit="run", quiet=bool(config.get("quiet", False)))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
        try:
            print(summarize(config.hydra.sweep.dir), flush=True)
        except FileNotFoundError as e:  # a sweep whose every job failed has nothing to summarise
            log.warning("%s", e)
