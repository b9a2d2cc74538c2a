"""``python -m gradsweep``: one run, or a Hydra multirun with ``-m``."""

from __future__ import annotations

import logging
import sys
from typing import Any

from omegaconf import DictConfig

from gradsweep.config.sections import ConfigError
from gradsweep.config.store import register
from gradsweep.sweep.preflight import CONF_DIR, check_overrides

log = logging.getLogger("gradsweep")

# Hydra flags after which nothing trains: let Hydra answer them without our checks.
_INFO_FLAGS = ("help", "hydra_help", "cfg", "info", "shell_completion")


def run(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra task: train one configuration, write its tables, return its summary row."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from gradsweep.engine.train import train_group
    from gradsweep.results.store import write_tables
    from gradsweep.results.tables import build_tables
    from gradsweep.sweep.compose import to_run_cfg
    from gradsweep.sweep.group import job_result

    try:
        run_cfg = to_run_cfg(cfg)
        trace = train_group([run_cfg])
    except ConfigError as e:  # bad input: one line, non-zero exit, nothing written
        print(f"gradsweep: error: {e}", file=sys.stderr)
        sys.exit(2)
    hc = HydraConfig.get()
    meta = {"job_num": hc.job.num if hc.mode == RunMode.MULTIRUN else None,
            "override_dirname": hc.job.override_dirname}
    runs, steps = build_tables([run_cfg], trace, [meta])
    write_tables(hc.runtime.output_dir, runs, steps)
    row = runs.iloc[0]
    log.info("%s: verdict=%s grad_ratio_log10=%.3g final_loss=%.4g (%s)", hc.job.override_dirname or "run",
             row["verdict"], row["grad_ratio_log10"], row["final_loss"], hc.runtime.output_dir)
    return job_result(row)


run.gradsweep_fusable = True  # the fused launcher trains this task's jobs in stacked groups


def check_writable(overrides: list[str], multirun: bool) -> None:
    """Refuse an output directory that cannot be written, before Hydra creates anything in it."""
    import os
    from pathlib import Path

    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    target = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+") == key), "outputs")
    existing = Path(target).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    probe = existing / f".gradsweep-write-test-{os.getpid()}"
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is a file")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{key}={target!r} is not writable ({e.strerror or e} at {existing}); "
                          f"give another with {key}=<dir>") from None


def main(argv: list[str] | None = None) -> None:
    """Check the overrides, then hand over to Hydra."""
    import hydra

    from gradsweep.hydra_shim import args_parser

    argv = sys.argv[1:] if argv is None else argv
    args = args_parser().parse_args(argv)
    own_config = args.config_name is None and args.config_dir is None and args.config_path is None
    if own_config and not any(getattr(args, flag) for flag in _INFO_FLAGS):
        try:
            check_overrides(args.overrides, args.multirun)
            check_writable(args.overrides, args.multirun)
        except ConfigError as e:
            print(f"gradsweep: error: {e}", file=sys.stderr)
            sys.exit(2)
    sys.argv = [sys.argv[0], *argv]
    register()  # the presets' bases, valued as the dataclasses' defaults
    hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(run)()


def command() -> None:
    """The ``gradsweep`` console script: :func:`main`, ended without the interpreter's teardown."""
    from gradsweep.shutdown import run_and_exit

    run_and_exit(main)
