"""The parquet schema (its one definition), the run tables built from a training trace, and ``load_sweep``.

A run's tables are two zstd parquet files, in its own directory (a single run, Hydra's basic launcher) or
shared by its group in ``<sweep_dir>/groups/<first job>/`` (the fused launcher, whose runs rows then also
store ``run_dir``, each run's directory relative to the group's); ``load_runs``/``load_steps`` read both:

``runs.parquet``
    One row per run: ``run_id``, ``job_num``, ``override_dirname``, every config value flattened to a
    column named like its override key (``model.depth``, ``init``, ``optim.lr``, ``train.clip_norm``, ...;
    ``+key=value`` additions too), then the results in ``RESULT_COLUMNS``.
``steps.parquet``
    One row per logged step and layer (Linear layers 1..depth+1, norm layers), columns ``STEP_COLUMNS``.
    Rows stop at the step where a run diverged.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import shutil
import types
import typing
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import yaml

from gradsweep.config import SECTIONS, RunCfg, column_of, config_hash, flatten
from gradsweep.schema import LAYER_STATS
from gradsweep.verdicts import conditions, dead_runs, underflow_floor, verdicts

RUNS_FILE = "runs.parquet"
STEPS_FILE = "steps.parquet"
# A sweep's runs tables in one file, written at the end of a multirun (and by the report): reading
# 10,000 small files costs ~30 s, this one ~0.1 s. Used only while it lists exactly the run files
# present and none is newer than it; otherwise the files are read again.
RUNS_INDEX = "runs-index.parquet"
# The fused launcher writes one runs and one steps file per group of runs trained together, under
# <sweep_dir>/groups/<first job number>/; the runs file stores each row's run directory (relative to it).
GROUPS_DIR = "groups"
TUNE_DIR = "tune"  # where gradsweep.tune writes its study under an output directory
# The tables' schema version, stored in every parquet file's metadata; a sweep written with an older one is
# refused by the report (its verdicts mean something else). 2: whole-run verdicts (gradsweep.verdicts).
SCHEMA_VERSION = 2
SCHEMA_KEY = b"gradsweep.schema"

ID_COLUMNS: dict[str, pa.DataType] = {
    "run_id": pa.string(),  # hash of the run's full resolved config (gradsweep.config.config_hash)
    "job_num": pa.int64(),  # Hydra's job number in a multirun; null for a single run
    "override_dirname": pa.string(),  # Hydra's override_dirname (the sweep overrides of this job)
}

RESULT_COLUMNS: dict[str, pa.DataType] = {
    "device": pa.string(),  # the device the run trained on (cpu, cuda:0, ...)
    "initial_loss": pa.float64(),  # loss at step 0, before any update
    "final_loss": pa.float64(),  # loss on the whole data set after the last step (NaN/inf if diverged)
    "min_loss": pa.float64(),  # smallest finite loss seen (logged steps and the final evaluation)
    "test_loss": pa.float64(),  # loss on the data's held-out points after the last step (NaN without them)
    "test_accuracy": pa.float64(),  # their accuracy, classification data (data=digits); NaN otherwise
    # first step with a non-finite loss or gradient norm (= train.steps if only the final loss is); null if none
    "diverged_step": pa.int64(),
    "diverged_reason": pa.string(),  # what was non-finite there: loss | gradient (its norm) | final loss; null if none
    "grad_ratio_log10": pa.float64(),  # log10(|dL/dh_1| / |dL/dh_{depth+1}|) at step 0: < 0 vanishing, > 0 exploding
    "grad_ratio_log10_median": pa.float64(),  # its median over the logged steps before divergence
    "wgrad_ratio_log10": pa.float64(),  # log10(|dL/dW_1| / |dL/dW_{depth+1}|) at step 0
    "wgrad_ratio_log10_median": pa.float64(),  # its median over the logged steps before divergence
    "pred_grad_ratio_log10": pa.float64(),  # mean-field prediction of grad_ratio_log10 (gradsweep.theory); NaN: none
    "pred_wgrad_ratio_log10": pa.float64(),  # mean-field prediction of wgrad_ratio_log10; NaN: none
    "pred_chi": pa.list_(pa.float64()),  # predicted per-block factor chi_l (|dL/dh_l|^2 / |dL/dh_l+1|^2), blocks 1..depth
    "pred_note": pa.string(),  # why theory makes no prediction for this run (residual, norm, ...); null when it does
    "baseline_loss": pa.float64(),  # the trivial predictor's loss on the training data (losses.baseline_loss); NaN: none
    "loss_drop_log10": pa.float64(),  # log10(initial_loss / final_loss): decades the loss fell
    "dead_step": pa.int64(),  # first logged step of the final stretch where no signal reaches layer 1 (a cut); null
    "dead_layer": pa.int64(),  # then: the lowest Linear layer that still receives signal (where it is cut off); null
    "init_verdict": pa.string(),  # healthy | vanishing | exploding, from grad_ratio_log10 at step 0 alone
    "verdict": pa.string(),  # the whole run: diverged | dead | vanishing | exploding | stalled | healthy (gradsweep.verdicts)
    "wall_s": pa.float64(),  # wall-clock seconds of the training call that trained this run
    "group_size": pa.int64(),  # how many runs trained together in that call
}

STEP_COLUMNS: dict[str, pa.DataType] = {
    "run_id": pa.string(),
    "step": pa.int64(),  # optimiser step; statistics are taken before that step's update
    "layer": pa.int64(),  # block number: 1..depth hidden blocks, depth + 1 the readout
    "kind": pa.string(),  # linear | norm
    "loss": pa.float64(),  # the run's loss at this step (repeated on each layer's row)
    "grad_norm": pa.float64(),  # total gradient norm over all parameters, before clipping
    "clipped": pa.bool_(),  # whether clipping scaled this step's gradients
    **{name: (pa.int64() if name == "wgrad_nonfinite" else pa.float64()) for name in LAYER_STATS},
}
STEPS_SCHEMA = pa.schema(list(STEP_COLUMNS.items()))

_PA_TYPES = {int: pa.int64(), float: pa.float64(), str: pa.string(), bool: pa.bool_()}


@functools.cache
def config_columns() -> dict[str, pa.DataType]:
    """Arrow types of the flattened config columns, derived from the dataclass schemas."""
    out = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            hint = typing.get_type_hints(cls)[f.name]
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            out[column_of(section, f.name)] = _PA_TYPES[hint]
    out["loss"] = pa.string()
    return out


def _log10_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(a / b)


@functools.cache
def _input_q(data_key: tuple) -> tuple[float, int, int]:
    """The data's mean squared input entry (mean-field theory's q_in), input and output sizes."""
    from gradsweep.config import DataCfg
    from gradsweep.data import load_data

    d = load_data(DataCfg(*data_key))
    return float(d.x.double().square().mean()), d.x.shape[1], d.out_dim


def _prediction(cfg: RunCfg, data: tuple[float, int, int]) -> dict[str, Any]:
    """The run's mean-field columns; ``data`` is ``_input_q`` of its data (one per group: its runs share it)."""
    from gradsweep.theory import predict

    p = predict(cfg, *data)
    if isinstance(p, str):
        return {"pred_grad_ratio_log10": np.nan, "pred_wgrad_ratio_log10": np.nan, "pred_chi": None, "pred_note": p}
    return {"pred_grad_ratio_log10": p.grad_ratio_log10, "pred_wgrad_ratio_log10": p.wgrad_ratio_log10,
            "pred_chi": list(p.chi), "pred_note": None}


def build_tables(cfgs: list[RunCfg], trace: Any, meta: list[dict[str, Any]] | None = None,
                 arrow: bool = False) -> tuple[pd.DataFrame, Any]:
    """The runs and steps tables of a trained group (``trace`` is a ``train.GroupTrace``).

    ``meta[r]`` may give ``job_num`` and ``override_dirname`` for run r. The steps table is a pandas
    DataFrame, or with ``arrow`` the ``pyarrow.Table`` that ``write_group`` writes without converting.
    """
    from gradsweep.model import layers

    lays = layers(cfgs[0].model)
    T, R = trace.loss.shape
    L = len(lays)
    S = {name: i for i, name in enumerate(LAYER_STATS)}
    run_ids = np.array([config_hash(c) for c in cfgs], dtype=object)
    div = trace.diverged_step
    valid = (div[None, :] < 0) | (trace.steps[:, None] < div[None, :])  # (T, R) steps before divergence

    # Per-layer rows, run-major: (R, T, L) flattened, then the rows after divergence dropped.
    lay = trace.layer.transpose(1, 0, 2, 3)  # (R, T, L, S)
    keep = ((div[:, None] < 0) | (trace.steps[None, :] <= div[:, None]))  # (R, T) up to and including it
    keep_rows = np.repeat(keep.reshape(-1), L)
    # Built as arrow columns from numpy (strings as dictionary indices, cast once in C++): no Python
    # objects per row, so a group of 1,000 runs x 200 steps x 11 layers costs milliseconds, not seconds.
    run_idx = np.repeat(np.arange(R, dtype=np.int32), T * L)[keep_rows]
    kind_idx = np.tile(np.array([0 if la.kind == "linear" else 1 for la in lays], dtype=np.int32), R * T)[keep_rows]
    cols: dict[str, Any] = {
        "run_id": pa.DictionaryArray.from_arrays(run_idx, pa.array(list(run_ids), pa.string())).cast(pa.string()),
        "step": np.tile(np.repeat(trace.steps, L), R)[keep_rows],
        "layer": np.tile(np.array([la.index for la in lays], dtype=np.int64), R * T)[keep_rows],
        "kind": pa.DictionaryArray.from_arrays(kind_idx, pa.array(["linear", "norm"])).cast(pa.string()),
        "loss": np.repeat(trace.loss.T.reshape(-1), L)[keep_rows],
        "grad_norm": np.repeat(trace.grad_norm.T.reshape(-1), L)[keep_rows],
        "clipped": np.repeat(trace.clipped.T.reshape(-1), L)[keep_rows],
    }
    flat = lay.reshape(R * T * L, len(LAYER_STATS))[keep_rows]
    for name, i in S.items():
        cols[name] = flat[:, i].astype(np.int64) if name == "wgrad_nonfinite" else np.ascontiguousarray(flat[:, i])
    steps = pa.table({k: cols[k] for k in STEP_COLUMNS}, schema=STEPS_SCHEMA)

    first, last = 0, L - 1  # linear1 and the readout
    h = trace.layer[:, :, :, S["hgrad_norm"]]
    w = trace.layer[:, :, :, S["wgrad_norm"]]
    ratio_t = _log10_ratio(h[:, :, first], h[:, :, last])  # (T, R)
    wratio_t = _log10_ratio(w[:, :, first], w[:, :, last])
    with warnings.catch_warnings():  # all-NaN columns (a run diverged at step 0) are legitimate NaN results
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(np.where(valid, ratio_t, np.nan), axis=0)
        wmedian = np.nanmedian(np.where(valid, wratio_t, np.nan), axis=0)
        losses = np.where(valid & np.isfinite(trace.loss), trace.loss, np.nan)
        final_ok = np.where(np.isfinite(trace.final_loss), trace.final_loss, np.nan)
        min_loss = np.nanmin(np.vstack([losses, final_ok[None, :]]), axis=0)
    diverged = div >= 0
    linear = [k for k, la in enumerate(lays) if la.kind == "linear"]
    dead_step, dead_layer = dead_runs(h[:, :, linear], trace.steps, valid, np.array([lays[k].index for k in linear]),
                                      underflow_floor(cfgs[0].train.dtype))
    baseline = np.full(R, trace.baseline_loss)
    cond = conditions(ratio_t[0], median, trace.final_loss, baseline,
                      *(np.array([getattr(c.verdict, k) for c in cfgs]) for k in ("vanish_below", "explode_above",
                                                                                    "stall_margin")))
    verdict, init_verdict = verdicts(diverged, dead_step >= 0, cond)
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = np.log10(trace.loss[0] / trace.final_loss)
    meta = meta or [{} for _ in cfgs]
    data = _input_q(dataclasses.astuple(cfgs[0].data))  # a group's runs share their data (group_key)
    rows = []
    for r, cfg in enumerate(cfgs):
        rows.append({
            "run_id": run_ids[r],
            "job_num": meta[r].get("job_num"),
            "override_dirname": meta[r].get("override_dirname", ""),
            **flatten(cfg),
            "device": trace.device,
            "initial_loss": trace.loss[0, r],
            "final_loss": trace.final_loss[r],
            "min_loss": min_loss[r],
            "test_loss": trace.test_loss[r],
            "test_accuracy": trace.test_accuracy[r],
            "diverged_step": int(div[r]) if diverged[r] else None,
            "diverged_reason": trace.diverged_reason[r],
            "grad_ratio_log10": ratio_t[0, r],
            "grad_ratio_log10_median": median[r],
            "wgrad_ratio_log10": wratio_t[0, r],
            "wgrad_ratio_log10_median": wmedian[r],
            **_prediction(cfg, data),
            "baseline_loss": baseline[r],
            "loss_drop_log10": drop[r],
            "dead_step": int(dead_step[r]) if dead_step[r] >= 0 else None,
            "dead_layer": int(dead_layer[r]) if dead_step[r] >= 0 else None,
            "init_verdict": init_verdict[r],
            "verdict": verdict[r],
            "wall_s": trace.wall_s,
            "group_size": R,
        })
    runs = pd.DataFrame(rows)
    known = {**ID_COLUMNS, **config_columns(), **RESULT_COLUMNS}
    for col in runs.columns:  # nullable integers as pandas Int64, the same as load_sweep returns
        if known.get(col) == pa.int64():
            runs[col] = runs[col].astype("Int64")
    return runs, (steps if arrow else steps.to_pandas())


def runs_schema(runs: pd.DataFrame) -> pa.Schema:
    """The runs table's schema: fixed types for the known columns, inferred ones for ``+key`` extras."""
    known = {**ID_COLUMNS, **config_columns(), **RESULT_COLUMNS}
    fields = []
    for col in runs.columns:
        typ = known.get(col) or pa.Array.from_pandas(runs[col]).type
        fields.append(pa.field(col, typ))
    return pa.schema(fields)


# Steps files are large and mostly floats: dictionary-encode only the repeated strings, and keep min/max
# statistics only on the columns readers filter on (a third less time to write, the same size).
STEPS_WRITE_OPTIONS = {"use_dictionary": ["run_id", "kind"], "write_statistics": ["run_id", "step", "layer", "kind"]}


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
    return _versioned(runs_t, SCHEMA_VERSION), _versioned(steps_t, SCHEMA_VERSION)


def _versioned(table: pa.Table, version: int) -> pa.Table:
    return table.replace_schema_metadata({SCHEMA_KEY: str(version).encode()})


def schema_version(table: pa.Table) -> int:
    """The gradsweep schema version a table was written with (1: before versions were recorded)."""
    return int((table.schema.metadata or {}).get(SCHEMA_KEY, b"1"))


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


def completed_runs(sweep_dir: Path, busy: frozenset[Path] = frozenset()) -> dict[str, dict[str, Any]]:
    """The runs a fused sweep in ``sweep_dir`` completed before (a rerun resumes from them), by run directory
    relative to ``sweep_dir``, as runs-table records.

    A group's ``runs.parquet`` is written last and atomically, so a group without one was interrupted: its
    directory is removed, with every temporary an interrupted writer left anywhere in the sweep, except in
    the ``busy`` directories (groups and runs a job still running elsewhere is writing).
    """
    groups = sweep_dir / GROUPS_DIR
    busy = frozenset(Path(os.path.abspath(b)) for b in busy)
    for tmp in sweep_dir.rglob(".*.tmp-*") if sweep_dir.is_dir() else []:
        if not busy.intersection(Path(os.path.abspath(tmp)).parents):
            tmp.unlink(missing_ok=True)
    out: dict[str, dict[str, Any]] = {}
    if not groups.is_dir():
        return out
    for group_dir in sorted(groups.iterdir()):
        runs_file = group_dir / RUNS_FILE
        if not runs_file.is_file():
            if Path(os.path.abspath(group_dir)) not in busy:
                shutil.rmtree(group_dir, ignore_errors=True)
            continue
        table = pq.read_table(runs_file)
        for rec in table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get).to_dict("records"):
            rel = Path(os.path.relpath(os.path.normpath(group_dir / rec["run_dir"]), sweep_dir)).as_posix()
            out[rel] = rec
    return out


def _natural_key(path: Path) -> list:
    return [int(tok) if tok.isdigit() else tok for tok in re.split(r"(\d+)", path.as_posix())]


def _run_files(root: Path) -> list[Path]:
    """The runs files that hold runs under ``root``: its own, or for one run of a fused sweep, its group's."""
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory")
    # A learning-rate search stored in the sweep's directory (<sweep>/tune/) is its own study, not runs of the sweep.
    files = sorted((f for f in root.rglob(RUNS_FILE) if f.relative_to(root).parts[0] != TUNE_DIR), key=_natural_key)
    if not files:  # a run directory of a fused sweep: its rows are in its group's files beside it
        files = sorted((root.parent / GROUPS_DIR).glob(f"*/{RUNS_FILE}"), key=_natural_key)
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
    root = Path(path)
    files = _run_files(root)
    grouped = {f for f in files if f.parent.parent.name == GROUPS_DIR}
    with ThreadPoolExecutor(4) as pool:  # parquet reads release the GIL
        stored = dict(zip(grouped, pool.map(lambda f: pq.read_table(f, columns=["run_dir"]).column(0).to_pylist(),
                                            grouped)))
    per_file = [_run_dirs(root, f, stored.get(f)) for f in files]
    rel = sorted((d for dirs in per_file for d in dirs if _inside(d)), key=lambda d: _natural_key(Path(d)))
    if not rel:
        raise FileNotFoundError(f"{root}: no gradsweep runs found (no {RUNS_FILE} under it)")
    index = root / RUNS_INDEX
    table = None
    if index.exists() and index.stat().st_mtime_ns >= max(f.stat().st_mtime_ns for f in files):
        cached = pq.read_table(index)
        if cached.column("run_dir").to_pylist() == rel:
            table = cached
    if table is None:
        with ThreadPoolExecutor(4) as pool:
            tables = list(pool.map(lambda f: pq.read_table(f, use_threads=False), files))
        version = min(schema_version(t) for t in tables)
        parts = []
        for t, dirs in zip(tables, per_file):
            if "run_dir" in t.column_names:
                t = t.drop_columns(["run_dir"])
            dirs = dirs * t.num_rows if len(dirs) == 1 and t.num_rows > 1 else dirs
            t = t.append_column("run_dir", pa.array(dirs, pa.string()))
            parts.append(t.filter(pa.array([_inside(d) for d in dirs])))
        table = pa.concat_tables(parts, promote_options="default")
        order = sorted(range(table.num_rows), key=lambda i: _natural_key(Path(table.column("run_dir")[i].as_py())))
        table = _versioned(table.take(pa.array(order, pa.int64())), version)
        if write_index and len(rel) > 1:
            try:
                _write_atomic(table, index)
            except OSError:  # a read-only sweep is still readable
                pass
    # Nullable integers (job_num, diverged_step, train.batch_size) stay integers, with <NA> for null.
    runs = table.to_pandas(types_mapper={pa.int64(): pd.Int64Dtype()}.get).reset_index(drop=True)
    runs.attrs["schema_version"] = schema_version(table)  # the oldest of its files'
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
    table = dataset.to_table(columns=columns, filter=filter)
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
    (``runs.query("`model.depth` == 30")``); here the first underscore stands for the dot:
    ``select(runs, model_depth=30, init="kaiming", optim_lr=[0.01, 0.1])``.
    """
    mask = pd.Series(True, index=runs.index)
    for name, value in equal.items():
        col = name if name in runs.columns else name.replace("_", ".", 1)
        if col not in runs.columns:
            raise KeyError(f"{name!r} names no column; columns: {', '.join(map(str, runs.columns))}")
        values = list(value) if isinstance(value, (list, tuple, set)) else [value]
        mask &= runs[col].isin(values)
    return runs[mask]
