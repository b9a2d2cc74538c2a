"""Which sweeps a report reads: the newest under outputs/multirun, a search's folder, the sweeps a date
directory holds (merged when their commands set the same keys), Hydra's record of each command, and the runs
that repeat another's configuration."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from gradsweep.errors import GradsweepError
from gradsweep.results.schema import RUNS_FILE, TUNE_DIR
from gradsweep.results.store import natural_key


class ReportError(GradsweepError):
    """A report that cannot be made: one line for the user."""


def latest_sweep(root: Path = Path("outputs/multirun")) -> Path:
    """The newest sweep directory under ``root`` (outputs/multirun/<date>/<time>)."""
    sweeps = [p for p in root.glob("*/*") if p.is_dir()]
    if not sweeps:
        raise ReportError(f"no sweep found under {root}; give the sweep directory: python -m gradsweep.report <sweep_dir>")
    return max(sweeps, key=lambda p: p.stat().st_mtime)


def _task(sweep_dir: Path) -> list[str] | None:
    """The overrides of the multirun command that made ``sweep_dir`` (Hydra's ``multirun.yaml``), or None."""
    from omegaconf import OmegaConf

    path = sweep_dir / "multirun.yaml"
    return [str(item) for item in OmegaConf.load(path).hydra.overrides.task] if path.is_file() else None


def sweep_command(sweep_dir: Path) -> str:
    """The command that made the sweep, from Hydra's own record of it."""
    from omegaconf import OmegaConf

    task = _task(sweep_dir)
    if task is not None:
        return "python -m gradsweep -m " + " ".join(task)
    if (sweep_dir / ".hydra" / "overrides.yaml").exists():
        return "python -m gradsweep " + " ".join(map(str, OmegaConf.load(sweep_dir / ".hydra" / "overrides.yaml")))
    return ""


def command_order(sweep_dir: Path) -> dict[str, list[str]]:
    """Each swept key's values in the order the command gave them (``key=a,b,c``), from Hydra's record."""
    order: dict[str, list[str]] = {}
    for item in _task(sweep_dir) or []:
        key, _, values = item.partition("=")
        if "," in values and "(" not in values and "[" not in values:  # a plain list, not range()/choice()/[...]
            order[key.lstrip("+~")] = [v.strip() for v in values.split(",")]
    return order


def search_or_sweep(path: Path) -> Path:
    """The directory whose runs the report reads: ``path``, or a learning-rate search's ``<tune.out_dir>/tune``
    when ``path`` is the search's folder (its runs are all there)."""
    if not path.is_dir():
        raise ReportError(f"{path}: no such directory")
    if (path / TUNE_DIR).is_dir() and not any(f.relative_to(path).parts[0] != TUNE_DIR for f in path.rglob(RUNS_FILE)):
        return path / TUNE_DIR
    return path


def find_sweeps(root: Path) -> list[Path]:
    """The sweeps under ``root``: ``root`` itself when it is one (or a run's, or a search's directory), else each
    directory below it with Hydra's ``multirun.yaml`` (a date directory holding several), in natural order."""
    if (root / "multirun.yaml").is_file():
        return [root]
    found = sorted((f.parent for f in root.rglob("multirun.yaml") if TUNE_DIR not in f.relative_to(root).parts),
                   key=natural_key)
    return found or [root]


def command_keys(sweep_dir: Path) -> frozenset[str]:
    """The config keys a sweep's command set (``model.depth=2,10`` and ``+model.x=1`` alike), from Hydra's record."""
    return frozenset(item.partition("=")[0].lstrip("+~") for item in _task(sweep_dir) or [])


def check_merge(root: Path, sweeps: list[Path], merge: bool) -> None:
    """Several sweeps are reported together when their commands set the same keys (the same sweep run again, or
    run on at other values), or when the user asked for it (``merge``); sweeps of different keys are not."""
    keys = {s: command_keys(s) for s in sweeps}
    if merge or len(set(keys.values())) <= 1:
        return
    listing = "; ".join(f"{s.relative_to(root).as_posix()}: {', '.join(sorted(k)) or '(no overrides)'}"
                        for s, k in keys.items())
    first = sweeps[0]
    raise ReportError(f"{root} holds {len(sweeps)} sweeps whose commands set different keys ({listing}); report one "
                      f"(python -m gradsweep.report {first}), or give --merge to report them together")


def repeat_of(runs: pd.DataFrame) -> pd.Series:
    """Per run, the run_dir of the first run of the same run_id (the same configuration run again: a sweep
    repeated, or two sweeps that overlap); '' for the first of each."""
    first = runs.drop_duplicates("run_id").set_index("run_id")["run_dir"]
    return runs["run_id"].map(first).where(runs.duplicated("run_id"), "")


def repeat_notes(runs: pd.DataFrame) -> list[str]:
    """What the report says of the runs that repeat another's configuration (none: nothing)."""
    repeats = runs[runs["repeat_of"] != ""]
    if not len(repeats):
        return []
    verdict = runs.set_index("run_dir")["verdict"]
    differ = int((repeats["verdict"].to_numpy() != verdict.loc[repeats["repeat_of"]].to_numpy()).sum())
    return [f"{len(repeats)} of {len(runs)} runs repeat a configuration run before (the same run_id; repeat_of in "
            "summary.csv names the first): counted and drawn once, as the first"
            + (f"; {differ} of them ended with another verdict" if differ else "; every repeat ended with the same verdict")]
