"""The sweep directory on disk: atomic writes of a group's or a run's tables and of Hydra's job files, the one
resume index (runner and tuner alike), and the loaders (``load_runs``, ``load_steps``, ``load_sweep``).

Layouts and names are ``gradsweep.results.schema``'s. Nothing here imports torch.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

from gradsweep.results.compat import upgrade_runs, upgrade_steps
from gradsweep.results.schema import (
    GROUPS_DIR,
    RUNS_FILE,
    RUNS_INDEX,
    SCHEMA_VERSION,
    STEP_COLUMNS,
    STEPS_FILE,
    STEPS_SCHEMA,
    TUNE_DIR,
    runs_schema,
    schema_version,
    versioned,
)

# Steps files are large and mostly floats: dictionary-encode only the repeated strings, and keep min/max
# statistics only on the columns readers filter on (a third less time to write, the same size).
STEPS_WRITE_OPTIONS = {"use_dictionary": ["run_id", "kind", "layer_name"],
                       "write_statistics": ["run_id", "step", "layer", "kind"]}


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary name beside ``path`` (``.<name>.tmp-<pid><suffix>``, which a resumed sweep removes) to write
    to; it replaces ``path`` when the block ends without error, so ``path`` appears whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: Path, text: str) -> None:
    with atomic(path) as tmp:
        tmp.write_text(text)


def _write_atomic(table: pa.Table, path: Path, **options: Any) -> None:
    with atomic(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", **options)


def _to_arrow(runs: pd.DataFrame, steps: pd.DataFrame | pa.Table) -> tuple[pa.Table, pa.Table]:
    steps_t = steps if isinstance(steps, pa.Table) else \
        pa.Table.from_pandas(steps[list(STEP_COLUMNS)], schema=STEPS_SCHEMA, preserve_index=False)
    runs_t = pa.Table.from_pandas(runs, schema=runs_schema(runs), preserve_index=False)
    return versioned(runs_t, SCHEMA_VERSION), versioned(steps_t, SCHEMA_VERSION)


def _write_run(run_dir: Path, runs_t: pa.Table, steps_t: pa.Table) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    # steps first: a runs.parquet is the mark of a complete run, so it must never precede its steps.
    _write_atomic(steps_t, run_dir / STEPS_FILE, **STEPS_WRITE_OPTIONS)
    _write_atomic(runs_t, run_dir / RUNS_FILE)


def write_tables(run_dir: str | Path, runs: pd.DataFrame, steps: pd.DataFrame) -> None:
    """Write ``runs.parquet`` and ``steps.parquet`` into ``run_dir``, each appearing atomically."""
    _write_run(Path(run_dir), *_to_arrow(runs, steps))


def write_job_files(job_dir: Path, config: dict, overrides: list[str], output_subdir: str | None) -> None:
    """What Hydra writes into a job's directory: ``<output_subdir>/config.yaml`` and ``overrides.yaml``."""
    if output_subdir is None:
        job_dir.mkdir(parents=True, exist_ok=True)
        return
    hydra_dir = job_dir / output_subdir
    hydra_dir.mkdir(parents=True, exist_ok=True)
    dump = dict(Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), default_flow_style=False, sort_keys=False,
                allow_unicode=True)
    for name, value in (("config.yaml", config), ("overrides.yaml", list(overrides))):
        write_text_atomic(hydra_dir / name, yaml.dump(value, **dump))


def write_group(group_dir: Path, run_dirs: list[Path], runs: pd.DataFrame, steps: pd.DataFrame | pa.Table) -> None:
    """Write a trained group's tables once, into ``group_dir`` (``<sweep>/groups/<first job>``): one runs file
    whose rows store their run directories (relative to ``group_dir``), one steps file. Writing a file per run
    costs a few milliseconds a run; ``load_runs`` and ``load_steps`` read both layouts alike."""
    runs_t, steps_t = _to_arrow(runs, steps)
    stored = [Path(os.path.relpath(d, group_dir)).as_posix() for d in run_dirs]
    _write_run(group_dir, runs_t.append_column("run_dir", pa.array(stored, pa.string())), steps_t)


def write_job_dirs(run_dirs: list[Path], job_files: list[tuple[dict, list[str]]],
                   output_subdir: str | None) -> list[Exception | None]:
    """Each run's Hydra job directory with its config and overrides; a run whose directory cannot be
    written gets its exception in the returned list, the others are written."""
    def write(r: int) -> Exception | None:
        try:
            write_job_files(Path(run_dirs[r]), *job_files[r], output_subdir)
            return None
        except Exception as e:  # one run's failure is that run's, not the group's
            return e

    with ThreadPoolExecutor(4) as pool:  # file I/O releases the GIL
        return list(pool.map(write, range(len(run_dirs))))


class RunIndex:
    """The complete runs under a sweep directory ``root`` (a fused sweep's, or a study's ``tune/``): the one resume
    index of the runner and the tuner.

    A group's ``runs.parquet`` is written last and atomically, so a group directory with one holds complete runs
    and one without was interrupted. :meth:`refresh` reads only the groups it has not read yet, so a long study
    costs one read per group, not one per group per batch.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.by_id: dict[str, CompleteRun] = {}  # the first complete run of each run_id
        self.by_dir: dict[str, dict[str, Any]] = {}  # runs-table record by run directory relative to root
        self._read: set[str] = set()

    def refresh(self) -> RunIndex:
        for f in sorted((self.root / GROUPS_DIR).glob(f"*/{RUNS_FILE}")):
            if f.parent.name in self._read:
                continue
            self._read.add(f.parent.name)
            for rec in pq.read_table(f).to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get).to_dict("records"):
                run_dir = Path(os.path.normpath(os.path.abspath(f.parent / rec["run_dir"])))
                self.by_id.setdefault(rec["run_id"], CompleteRun(rec, f.parent, run_dir))
                self.by_dir[Path(os.path.relpath(run_dir, os.path.abspath(self.root))).as_posix()] = rec
        return self


@dataclass
class CompleteRun:
    """A complete run found by :class:`RunIndex`: its runs-table record, its group's and its own directory."""

    record: dict[str, Any]
    group_dir: Path
    run_dir: Path


def discard_incomplete(root: Path, busy: frozenset[Path] = frozenset(), groups: list[str] | None = None,
                       run_dirs: list[Path] = ()) -> None:
    """Remove what interrupted writers left under ``root``: every temporary, and each group directory without
    its ``runs.parquet`` (with ``run_dirs``, the job directories of its runs, where the caller knows them).

    ``groups``: only these group directories (by name) and the temporaries in them and in ``run_dirs``; None:
    the whole sweep. Nothing in the ``busy`` directories (groups and runs a job still running elsewhere is
    writing) is touched.
    """
    busy = frozenset(Path(os.path.abspath(b)) for b in busy)
    if groups is None:
        temporaries = list(root.rglob(".*.tmp-*")) if root.is_dir() else []
        group_dirs = sorted((root / GROUPS_DIR).iterdir()) if (root / GROUPS_DIR).is_dir() else []
    else:
        group_dirs = [root / GROUPS_DIR / g for g in groups]
        temporaries = [t for d in (*group_dirs, *run_dirs) for t in Path(d).rglob(".*.tmp-*")]
    for tmp in temporaries:
        if not busy.intersection(Path(os.path.abspath(tmp)).parents):
            tmp.unlink(missing_ok=True)
    for group_dir in group_dirs:
        # A named group that is gone already (another trial of it was cleaned first) still leaves its runs' dirs.
        if not (group_dir / RUNS_FILE).is_file() and Path(os.path.abspath(group_dir)) not in busy:
            shutil.rmtree(group_dir, ignore_errors=True)
            for d in run_dirs:
                shutil.rmtree(d, ignore_errors=True)


def completed_runs(sweep_dir: Path, busy: frozenset[Path] = frozenset()) -> dict[str, dict[str, Any]]:
    """The runs a fused sweep in ``sweep_dir`` completed before (a rerun resumes from them), by run directory
    relative to ``sweep_dir``, as runs-table records, after :func:`discard_incomplete` removed what an
    interrupted start left (except in the ``busy`` directories)."""
    discard_incomplete(sweep_dir, busy)
    return RunIndex(sweep_dir).refresh().by_dir


def natural_key(path: Path) -> list:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.as_posix())]


def _run_files(root: Path) -> list[Path]:
    """The runs files that hold runs under ``root``: its own, or for one run of a fused sweep, its group's."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    # A learning-rate search stored in the sweep's directory (<sweep>/tune/) is its own study, not runs of the sweep.
    files = sorted((f for f in root.rglob(RUNS_FILE) if f.relative_to(root).parts[0] != TUNE_DIR), key=natural_key)
    if not files:  # a run directory of a fused sweep: its rows are in its group's files beside it
        files = sorted((root.parent / GROUPS_DIR).glob(f"*/{RUNS_FILE}"), key=natural_key)
    if not files and (root / TUNE_DIR).is_dir() and any((root / TUNE_DIR).rglob(RUNS_FILE)):
        raise FileNotFoundError(f"{root}: its runs are a learning-rate search's, under {root / TUNE_DIR}; read that "
                                "directory (python -m gradsweep.report " + str(root / TUNE_DIR) + ")")
    if not files:
        raise FileNotFoundError(f"{root}: no gradsweep runs found (no {RUNS_FILE} under it)")
    return files


def _run_dirs(root: Path, f: Path, stored: list[str] | None) -> list[str]:
    """Each row's run directory relative to ``root``: a per-run file's own directory, or the stored one of a
    group file (relative to the group's directory); '..'-prefixed when it lies outside ``root``."""
    if stored is None:
        return [Path(os.path.relpath(f.parent, root)).as_posix()]
    return [Path(os.path.relpath(os.path.normpath(f.parent / d), root)).as_posix() for d in stored]


def _inside(rel: str) -> bool:
    return rel != ".." and not rel.startswith("../")


def load_runs(path: str | os.PathLike, write_index: bool = False) -> pd.DataFrame:
    """The runs table of a sweep directory (or one run's directory), with ``run_dir`` relative to ``path``.

    ``write_index``: (re)write the sweep's ``runs-index.parquet`` when it is missing or stale.
    """
    table, stale = runs_table(path)
    if write_index and stale:
        write_runs_index(path, table)
    return runs_frame(table)


def runs_table(path: str | os.PathLike) -> tuple[pa.Table, bool]:
    """The runs table of ``path`` as arrow (what :func:`load_runs` returns as pandas), and whether its
    ``runs-index.parquet`` is missing or stale (:func:`write_runs_index` writes it)."""
    root = Path(path)
    files = _run_files(root)
    grouped = {f for f in files if f.parent.parent.name == GROUPS_DIR}
    with ThreadPoolExecutor(4) as pool:  # parquet reads release the GIL
        stored = dict(zip(grouped, pool.map(lambda f: pq.read_table(f, columns=["run_dir"]).column(0).to_pylist(),
                                            grouped)))
    per_file = [_run_dirs(root, f, stored.get(f)) for f in files]
    rel = sorted((d for dirs in per_file for d in dirs if _inside(d)), key=lambda d: natural_key(Path(d)))
    if not rel:
        raise FileNotFoundError(f"{root}: no gradsweep runs found (no {RUNS_FILE} under it)")
    index = root / RUNS_INDEX
    if index.exists() and index.stat().st_mtime_ns >= max(f.stat().st_mtime_ns for f in files):
        cached = pq.read_table(index)
        if cached.column("run_dir").to_pylist() == rel:
            return upgrade_runs(cached), False  # an index written by an older version: as today's code reads it
    with ThreadPoolExecutor(4) as pool:
        tables = list(pool.map(lambda f: pq.read_table(f, use_threads=False), files))
    version = min(schema_version(t) for t in tables)
    parts = []
    for t, dirs in zip(tables, per_file):
        if "run_dir" in t.column_names:
            t = t.drop_columns(["run_dir"])
        dirs = dirs * t.num_rows if len(dirs) == 1 and t.num_rows > 1 else dirs
        t = upgrade_runs(t).append_column("run_dir", pa.array(dirs, pa.string()))
        parts.append(t.filter(pa.array([_inside(d) for d in dirs])))
    # permissive: a column one group typed int64 and another double (a module argument swept over 0 and 0.5)
    table = pa.concat_tables(parts, promote_options="permissive")
    order = sorted(range(table.num_rows), key=lambda i: natural_key(Path(table.column("run_dir")[i].as_py())))
    return versioned(table.take(pa.array(order, pa.int64())), version), len(rel) > 1


def write_runs_index(path: str | os.PathLike, table: pa.Table) -> None:
    """Write ``path``'s ``runs-index.parquet`` (the runs table in one file, read instead of every group's)."""
    try:
        _write_atomic(table, Path(path) / RUNS_INDEX)
    except OSError:  # a read-only sweep is still readable
        pass


def runs_frame(table: pa.Table) -> pd.DataFrame:
    """A runs table as pandas: nullable integers (job_num, diverged_step, train.batch_size) stay integers, with
    <NA> for null; ``attrs["schema_version"]`` the oldest of its files'."""
    runs = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get).reset_index(drop=True)
    runs.attrs["schema_version"] = schema_version(table)
    return runs


def load_steps(path: str | os.PathLike, columns: list[str] | None = None, filter: Any = None,
               run_ids: list[str] | None = None) -> pd.DataFrame:
    """The steps table of a sweep, read with pyarrow: only ``columns``, only rows matching ``filter``
    (a ``pyarrow.compute`` expression), all files of the sweep in one multi-threaded scan.

    Rows come run by run in the order of ``load_runs``, whether the sweep wrote a file per run or, fused,
    a file per group; a caller that holds ``load_runs(path).run_id`` already passes it as ``run_ids``."""
    root = Path(path)
    run_files = _run_files(root)
    files = [str(f.parent / STEPS_FILE) for f in run_files if (f.parent / STEPS_FILE).exists()]
    grouped = any(f.parent.parent.name == GROUPS_DIR for f in run_files)
    if grouped:
        ids = list(run_ids) if run_ids is not None else load_runs(root)["run_id"].tolist()
        keep = pc.field("run_id").isin(ids)
        filter = keep if filter is None else (filter & keep)
        if columns is not None and "run_id" not in columns:
            columns = ["run_id", *columns]
            drop = True
        else:
            drop = False
    dataset = pads.dataset(files, schema=STEPS_SCHEMA, format="parquet")
    extra = [c for c in ("kind", "layer") if columns is not None and "layer_name" in columns and c not in columns]
    table = upgrade_steps(dataset.to_table(columns=None if columns is None else [*columns, *extra], filter=filter))
    table = table.drop_columns(extra)
    if grouped:  # group files hold runs in group order: put them back in the sweep's (a stable sort)
        rank = pc.index_in(table.column("run_id"), value_set=pa.array(ids, pa.string()))
        table = table.take(pc.sort_indices(pa.table({"rank": rank}), sort_keys=[("rank", "ascending")]))
        if drop:
            table = table.drop_columns(["run_id"])
    return table.to_pandas().reset_index(drop=True)


def load_sweep(path: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a sweep directory (or one run's directory) into ``(runs, steps)`` pandas DataFrames.

    ``runs`` gains a ``run_dir`` column: the run's directory relative to ``path``.
    """
    runs = load_runs(path)
    return runs, load_steps(path, run_ids=runs["run_id"].tolist())


def select(runs: pd.DataFrame, **equal: Any) -> pd.DataFrame:
    """The rows of ``runs`` whose columns equal the given values (a list or tuple: any of them).

    Config columns are named like override keys, with dots, which ``DataFrame.query`` needs in backticks
    (``runs.query("`model.depth` == 30")``); here any underscore may stand for a dot:
    ``select(runs, model_net_depth=30, init="kaiming", optim_lr=[0.01, 0.1])``.
    """
    mask = pd.Series(True, index=runs.index)
    for name, value in equal.items():
        col = _column(runs, name)
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        mask &= runs[col].isin(values)
    return runs[mask]


def _column(runs: pd.DataFrame, name: str) -> str:
    """The column ``name`` means: itself, or the one column whose dots read as ``name``'s underscores."""
    flat = {str(c): str(c).replace(".", "_") for c in runs.columns}
    matches = [name] if name in flat else [c for c, f in flat.items() if f == name.replace(".", "_")]
    if len(matches) > 1:
        raise KeyError(f"{name!r} could name any of {', '.join(matches)}: pass the column's own name")
    if not matches:
        close = set(difflib.get_close_matches(name.replace(".", "_"), flat.values(), n=5, cutoff=0.5))
        hint = ", ".join(c for c, f in flat.items() if f in close) or f"none of its {len(flat)}; see runs.columns"
        raise KeyError(f"{name!r} names no column; closest: {hint}")
    return matches[0]
