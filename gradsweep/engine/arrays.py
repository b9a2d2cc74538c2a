"""``data=arrays``: a user's own data file (.npz, .csv or .parquet) read once per process and version, and checked:
each problem is a :class:`ConfigError` of one line naming the file. A ``DataCfg`` is bound to its file here (task,
n_samples, the file's digest), a step of its own so that building a config reads no file; ``gradsweep.engine.data`` splits
and standardises what it reads."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradsweep.config.checks import check
from gradsweep.config.sections import DataCfg, RunCfg, build_run_cfg
from gradsweep.errors import ConfigError, first_line

log = logging.getLogger("gradsweep.engine.data")

ARRAY_SUFFIXES = (".npz", ".csv", ".parquet")


@dataclass(frozen=True)
class ArrayFile:
    """A user's data file read and checked (``data=arrays``): features, targets (float values, or class indices
    where ``classes`` names the labels) and the file's own test split, if it has one."""

    x: np.ndarray
    y: np.ndarray
    x_test: np.ndarray | None
    y_test: np.ndarray | None
    task: str
    """regression or classification: data.task, or inferred from the targets (data.task=auto)."""
    classes: tuple | None
    """classification: the labels, in order of their class index."""
    digest: str
    """The first 16 hex digits of the file's sha256: part of every run's run_id."""


def bind_data(cfg: DataCfg) -> DataCfg:
    """``cfg`` (a ``DataCfg``) bound to its file when it is ``data=arrays``: the file read (once per process and
    version) and checked against the keys, and ``task``, ``digest``, ``in_dim``, ``out_dim`` and a null
    ``n_samples`` set from it, in place. Built-in data is returned as it is. Binding again reads nothing new."""
    if cfg.name != "arrays":
        return cfg
    f = read_arrays(cfg.path, cfg.target, cfg.task)
    cfg.task, cfg.digest = f.task, f.digest
    cfg.scale_target = bool(cfg.scale_target) and f.task == "regression"
    cfg.in_dim, cfg.out_dim = f.x.shape[1], len(f.classes) if f.classes else f.y.shape[1]
    if f.x_test is not None:
        check("data.n_test", cfg.n_test, cfg.n_test == 0, f"0 for {cfg.path}, which holds its own x_test")
    free = len(f.x) - cfg.n_test
    check("data.n_test", cfg.n_test, free >= 1, f"< {len(f.x)} for {cfg.path} ({len(f.x)} rows)")
    if cfg.n_samples is None:
        cfg.n_samples = free
    check("data.n_samples", cfg.n_samples, cfg.n_samples <= free,
          f"null or <= {free} for {cfg.path} ({len(f.x)} rows, data.n_test={cfg.n_test})")
    cfg.__post_init__()  # the bound values checked as any section's are
    return cfg


def bound_run_cfg(values: dict[str, Any]) -> RunCfg:
    """:func:`gradsweep.config.sections.build_run_cfg`, its data then bound to its file: the config a run trains from."""
    return build_run_cfg(values, bind_data)


def read_arrays(path: str, target: str | None, task: str) -> ArrayFile:
    """``data.path``'s file, read and checked; a :class:`ConfigError` naming the file and the problem otherwise.
    Read once per process and file version (path, size, modification time)."""
    p = Path(path).expanduser()
    if p.suffix.lower() not in ARRAY_SUFFIXES:
        raise ConfigError(f"data.path={path!r} is not a .npz, .csv or .parquet file")
    try:
        st = p.stat()
    except OSError as e:
        raise ConfigError(f"data.path={path!r}: {e.strerror or e} (looked in {p.absolute().parent})") from None
    return _read_arrays(str(p.absolute()), target, task, st.st_size, st.st_mtime_ns)


@functools.cache
def _read_arrays(path: str, target: str | None, task: str, size: int, mtime_ns: int) -> ArrayFile:
    x, y, xt, yt, digest = _load(path, target, size, mtime_ns)
    name, labels = Path(path).name, y if yt is None else np.concatenate([y, yt])
    resolved = _task(name, labels, task)
    if resolved != task:  # auto: the very reading of the task it resolves to (one per file version, one log line)
        return _read_arrays(path, target, resolved, size, mtime_ns)
    return _resolve(name, x, y, xt, yt, labels, digest, task)


@functools.cache
def _load(path: str, target: str | None, size: int, mtime_ns: int) -> tuple[Any, ...]:
    """The file's arrays and digest, read once per version whatever data.task asks of them."""
    import hashlib

    name = Path(path).name
    try:
        blob = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"data.path: {name} cannot be read ({e.strerror or e})") from None
    digest = hashlib.sha256(blob).hexdigest()[:16]
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        if target is not None:
            raise ConfigError(f"data.target={target!r} is for a .csv or .parquet file; {name} is .npz, whose "
                              "arrays are named x, y (and x_test, y_test)")
        x, y, xt, yt = _npz(path, name)
    else:
        x, y, xt, yt = _table(path, name, target, suffix)
    if len(x) == 0:
        raise ConfigError(f"data.path: {name} has no rows")
    return x, y, xt, yt, digest


def _resolve(name: str, x: np.ndarray, y: np.ndarray, xt: np.ndarray | None, yt: np.ndarray | None,
             labels: np.ndarray, digest: str, task: str) -> ArrayFile:
    """The file's arrays as ``task`` (regression or classification) takes them: class indices of ``labels`` (y and
    y_test together), or float targets checked finite."""
    classes = None
    if task == "classification":
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise ConfigError(f"data.path: {name}: classification needs one target per row, y has shape {y.shape}")
        classes_arr, idx = np.unique(labels, return_inverse=True)
        classes = tuple(classes_arr.tolist())
        y, yt = idx[:len(y)].astype(np.int64), (idx[len(y):].astype(np.int64) if yt is not None else None)
        if len(classes) < 2:
            raise ConfigError(f"data.path: {name}: classification needs at least 2 classes, the targets hold "
                              f"{len(classes)}")
    else:
        y = _numeric(name, "the target", y).reshape(len(y), -1)
        yt = _numeric(name, "y_test", yt).reshape(len(yt), -1) if yt is not None else None
    log.info("data=arrays: %s: %d rows, %d features, %s%s", name, len(x), x.shape[1], task,
             f" with {len(classes)} classes" if classes else f" with {y.shape[1]} output(s)")
    return ArrayFile(x, y, xt, yt, task, classes, digest)


def _numeric(name: str, what: str, a: np.ndarray) -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise ConfigError(f"data.path: {name}: {what} is not numeric ({a.dtype})")
    a = a.astype(np.float64)
    bad = ~np.isfinite(a)
    if bad.any():
        raise ConfigError(f"data.path: {name}: {what} holds {int(bad.sum())} NaN or infinite value(s)")
    return a


def _npz(path: str, name: str) -> tuple[np.ndarray, ...]:
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as e:  # a truncated or foreign file: zipfile, pickle or format errors
        raise ConfigError(f"data.path: {name} cannot be read as .npz ({first_line(e)})") from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise ConfigError(f"data.path: {name} has no array {' or '.join(missing)}; it holds "
                          f"{', '.join(sorted(arrays)) or 'none'} (expected x, y and optionally x_test, y_test)")
    scalar = [k for k in ("x", "y", "x_test", "y_test") if k in arrays and arrays[k].ndim == 0]
    if scalar:
        raise ConfigError(f"data.path: {name}: {', '.join(scalar)} is a single value, not an array of rows")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise ConfigError(f"data.path: {name} has {'x_test' if 'x_test' in arrays else 'y_test'} without "
                          f"{'y_test' if 'x_test' in arrays else 'x_test'}")
    x = arrays["x"].reshape(len(arrays["x"]), -1) if arrays["x"].ndim != 2 else arrays["x"]  # 1-D: one feature
    x = _numeric(name, "x", x)
    y = arrays["y"]
    if len(y) != len(x):
        raise ConfigError(f"data.path: {name}: x has {len(x)} rows and y {len(y)}: shapes {tuple(x.shape)} and "
                          f"{tuple(y.shape)} do not match")
    xt = yt = None
    if "x_test" in arrays:
        xt, yt = arrays["x_test"], arrays["y_test"]
        xt = _numeric(name, "x_test", xt.reshape(len(xt), -1) if xt.ndim != 2 else xt)
        if xt.shape[1] != x.shape[1] or len(yt) != len(xt) or yt.shape[1:] != y.shape[1:]:
            raise ConfigError(f"data.path: {name}: x_test {tuple(xt.shape)} and y_test {tuple(yt.shape)} do not match "
                              f"x {tuple(x.shape)} and y {tuple(y.shape)}")
    return x, y, xt, yt


def _table(path: str, name: str, target: str | None, suffix: str) -> tuple[np.ndarray, ...]:
    import pandas as pd

    try:
        frame = pd.read_csv(path) if suffix == ".csv" else pd.read_parquet(path)
    except Exception as e:
        raise ConfigError(f"data.path: {name} cannot be read as {suffix} ({first_line(e)})") from None
    columns = [str(c) for c in frame.columns]
    if target is None:
        raise ConfigError(f"data.target is required for a {suffix} file: the target column of {name}; valid values: "
                          f"{', '.join(columns)}")
    if target not in columns:
        raise ConfigError(f"data.target={target!r} is not a column of {name}; valid values: {', '.join(columns)}")
    if len(columns) < 2:
        raise ConfigError(f"data.path: {name} has no feature column besides the target {target!r}")
    frame.columns = columns
    if len(frame) == 0:
        raise ConfigError(f"data.path: {name} has no rows")
    features = frame.drop(columns=[target])
    text = [c for c in features.columns if features[c].dtype.kind not in "biuf"]
    if text:
        raise ConfigError(f"data.path: {name}: non-numeric feature column(s) {', '.join(text)} "
                          f"({', '.join(str(features[c].dtype) for c in text)})")
    missing = [c for c in frame.columns if frame[c].isna().any()]
    if missing:
        raise ConfigError(f"data.path: {name}: missing (NaN) values in column(s) {', '.join(missing)} "
                          f"({', '.join(str(int(frame[c].isna().sum())) for c in missing)} rows)")
    x = _numeric(name, "the features", features.to_numpy(dtype=np.float64, na_value=np.nan))
    y = frame[target].to_numpy()
    if y.dtype.kind == "O":
        y = y.astype(str)
    return x, y, None, None


def _task(name: str, y: np.ndarray, task: str) -> str:
    """data.task, or for auto what the targets are: integer, boolean or text labels classify, floats regress."""
    kind = y.dtype.kind
    if task == "auto":
        return "classification" if kind in "biuUS" else "regression"
    if task == "regression" and kind in "US":
        raise ConfigError(f"data.task=regression is not valid for {name}: its targets are text labels; "
                          "valid values: auto, classification")
    if task == "classification" and kind == "f" and not np.all(np.isfinite(y) & (y == np.round(y))):
        raise ConfigError(f"data.task=classification is not valid for {name}: its targets are not whole numbers; "
                          "valid values: auto, regression")
    return task
