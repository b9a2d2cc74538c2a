"""Hydra callbacks (configured in gradsweep/conf/config.yaml): a bar over a sweep's runs, and its summary at the end."""

from __future__ import annotations

import logging
import re
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from tqdm.auto import tqdm

from gradsweep.progress import bar

log = logging.getLogger("gradsweep")

SUMMARY_ROWS = 40  # runs listed one by one in the end-of-sweep summary; more are counted per verdict only


def count_jobs(overrides: list[str]) -> int | None:
    """How many jobs the basic sweeper makes of these command-line overrides (None if it cannot tell)."""
    # Hydra's basic sweeper expands the overrides into jobs: its own split_arguments counts them as the sweep runs them
    from gradsweep.hydra_shim import basic_sweeper, parse_overrides

    try:
        return sum(len(batch) for batch in basic_sweeper().split_arguments(parse_overrides(overrides), None))
    except Exception:  # e.g. interval() sweeps, which only a sampling sweeper expands
        return None


def overrides_of(dirname: str) -> dict[str, str]:
    """A run's ``override_dirname`` (Hydra's ``k=v,k=v``) as key -> value, as the command spelled them; a comma
    inside a value (a list) stays in it."""
    return dict(item.split("=", 1) for item in re.split(r",(?=[^,=\[\]{}()'\"]+=)", dirname) if "=" in item)


def run_table(runs) -> tuple[list[str], object]:
    """What the end-of-sweep summary prints of ``runs``: the overrides every run shares (``key=value``, said once)
    and a table with a column per override that varies, then the run's verdict and numbers (test_accuracy where
    the data hold a test split of classes)."""
    import pandas as pd

    per_run = [overrides_of(d or "") for d in runs["override_dirname"].fillna("")]
    keys = list(dict.fromkeys(k for o in per_run for k in o))
    swept = [k for k in keys if len({o.get(k) for o in per_run}) > 1]
    fixed = [f"{k}={per_run[0][k]}" for k in keys if k not in swept]
    table = pd.DataFrame({k: [o.get(k, "") for o in per_run] for k in swept}, index=runs.index)
    numbers = ["verdict", "grad_ratio_log10", "final_loss"]
    if "test_accuracy" in runs and runs["test_accuracy"].notna().any():
        numbers.append("test_accuracy")
    return fixed, pd.concat([table, runs[[*numbers, "diverged_step"]]], axis=1)


def sweep_end_lines(sweep_dir: str) -> str:
    """The lines printed when a sweep ends: runs per verdict, then (for small sweeps) the overrides its runs share and
    one line per run with the ones that tell it apart."""
    import pandas as pd

    from gradsweep.results.store import load_runs
    from gradsweep.results.verdicts import counts_text, verdict_counts

    runs = load_runs(sweep_dir, write_index=True)
    n = len(runs)
    lines = [f"{n} run{'s' if n != 1 else ''} in {sweep_dir}: " + counts_text(verdict_counts(runs))]
    if len(runs) <= SUMMARY_ROWS:
        fixed, table = run_table(runs)
        if fixed:
            lines.append(f"every run: {' '.join(fixed)}")
        with pd.option_context("display.width", 160, "display.max_colwidth", 60, "display.float_format", "{:.3g}".format):
            lines.append(table.to_string(index=False))
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
            print(sweep_end_lines(config.hydra.sweep.dir), flush=True)
        except FileNotFoundError as e:  # a sweep whose every job failed has nothing to summarise
            log.warning("%s", e)
