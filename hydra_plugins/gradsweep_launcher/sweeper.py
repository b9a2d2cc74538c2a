"""Hydra's basic sweeper, minus its second composition of every job when the fused launcher runs them, and
without stopping at the first failed run: every batch runs, then the failures are counted and reported."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Private, and the one use outside gradsweep.hydra_shim: Hydra ships its basic sweeper only in hydra._internal, and
# this class must subclass it where Hydra's plugin scan imports this module, which must not import gradsweep.
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from hydra_plugins.gradsweep_launcher import config as _config  # noqa: F401  (registers the configs)
from hydra_plugins.gradsweep_launcher.launcher import FusedLauncher


class GradsweepSweeper(BasicSweeper):  # Hydra's own override parsing, batching and multirun.yaml, kept exactly
    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        # BasicSweeper composes every job (Hydra's full composition, the wall at thousands of runs) only to fail
        # early on a bad one. The fused launcher composes and checks every job of a batch before it trains any, so
        # that is done there, once; for any other launcher or task, Hydra's own check stands.
        from gradsweep.sweep.group import fusable  # here, not at import: Hydra's plugin scan of any app imports this module

        if isinstance(self.launcher, FusedLauncher) and fusable(self.launcher.task_function):
            return
        super().validate_batch_is_legal(batch)

    def sweep(self, arguments: list[str]) -> Any:
        """BasicSweeper.sweep, except that a failed run does not stop the sweep: when every batch has run, the
        summary of the complete runs is printed, one line says how many failed and why the first did, exit 1."""
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        params_conf = self._parse_config()
        params_conf.extend(arguments)
        from gradsweep.hydra_shim import overrides_parser

        parser = overrides_parser(self.hydra_context.config_loader)
        self.overrides = self.split_arguments(parser.parse_overrides(params_conf), self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        from gradsweep.results.store import write_text_atomic

        write_text_atomic(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config))
        returns: list[Sequence[JobReturn]] = []
        failed: list[JobReturn] = []
        initial_job_idx = 0
        while not self.is_done():
            batch = self.get_job_batch()
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            failed += [r for r in results if r.status == JobStatus.FAILED]
            initial_job_idx += len(batch)
            returns.append(results)
        if failed:
            import sys

            # What Hydra does after a sweep (gradsweep's callback: close the sweep's bar, print the summary of the
            # complete runs), then the failure on a line of its own.
            self.hydra_context.callbacks.on_multirun_end(config=self.config)
            from gradsweep.errors import first_line
            from gradsweep.hydra_shim import job_exception

            first = failed[0]
            error = job_exception(first)  # without the second "Error executing job" line
            print(f"gradsweep: error: {len(failed)} of {initial_job_idx} runs failed (the first, "
                  f"{' '.join(first.overrides) or 'defaults'}: {type(error).__name__}: "
                  f"{first_line(error) if str(error).strip() else ''})"
                  + ("; the others are complete" if len(failed) < initial_job_idx else ""), file=sys.stderr, flush=True)
            raise SystemExit(1)
        return returns

