"""A trained group's trace summarised into its runs and steps tables: ratios, medians, verdicts and the
mean-field prediction (the one place that calls ``gradsweep.results.theory``). The schema is ``gradsweep.results.schema``'s."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from gradsweep.config.identity import as_tuple, config_hash, flatten
from gradsweep.config.sections import RunCfg
from gradsweep.engine.mlp import layers
from gradsweep.results.edge import lr_edge, phases
from gradsweep.results.schema import (
    ID_COLUMNS,
    LAYER_STATS,
    RESULT_COLUMNS,
    STEP_COLUMNS,
    STEPS_SCHEMA,
    config_columns,
)
from gradsweep.results.theory import predict
from gradsweep.results.verdicts import conditions, dead_runs, underflow_floor, verdicts

if TYPE_CHECKING:
    from gradsweep.engine.trace import GroupTrace

_STAT = {name: i for i, name in enumerate(LAYER_STATS)}  # a layer statistic's index on trace.layer's last axis


def _log10_ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.log10(a / b)


def _prediction(cfg: RunCfg, trace: GroupTrace, seen: dict[tuple, Any]) -> dict[str, Any]:
    """The run's mean-field columns, from the data's facts the trace carries (a group's runs share their data).
    ``seen``: predictions already made in this group, by model and init (all a prediction depends on besides the
    data; a sweep over lr, clip and seed has a handful, where computing one per run adds up in a large group)."""
    key = (as_tuple(cfg.model), as_tuple(cfg.init))
    if key not in seen:
        seen[key] = predict(cfg, trace.input_q, trace.in_dim, trace.out_dim)
    p = seen[key]
    if isinstance(p, str):
        return {"pred_grad_ratio_log10": np.nan, "pred_wgrad_ratio_log10": np.nan, "pred_chi": None, "pred_note": p}
    return {"pred_grad_ratio_log10": p.grad_ratio_log10, "pred_wgrad_ratio_log10": p.wgrad_ratio_log10,
            "pred_chi": list(p.chi), "pred_note": None}


def _ends(trace: GroupTrace, lays: list, weights: list[int], out_rms: int) -> tuple[np.ndarray, np.ndarray]:
    """Per run, the rows of the first and last Linear/Conv layer: for the MLP, linear1 and the readout; for a module,
    the first and last its forward pass called at step 0 (out_rms recorded), which a branch may make differ per
    run."""
    R = trace.layer.shape[1]
    first, last = np.full(R, weights[0]), np.full(R, weights[-1])
    if lays[0].path is None:
        return first, last
    called = np.isfinite(trace.layer[0][:, weights, out_rms])  # (R, Lw)
    some = called.any(axis=1)
    cols = np.array(weights)
    first = np.where(some, cols[called.argmax(axis=1)], first)
    last = np.where(some, cols[len(weights) - 1 - called[:, ::-1].argmax(axis=1)], last)
    return first, last


def _steps_table(trace: GroupTrace, lays: list, run_ids: np.ndarray) -> pa.Table:
    """The steps table as arrow: a row per run, logged step and layer, up to and including the run's divergence."""
    T, R = trace.loss.shape
    L = len(lays)
    div = trace.diverged_step
    # Per-layer rows, run-major: (R, T, L) flattened, then the rows after divergence dropped.
    lay = trace.layer.transpose(1, 0, 2, 3)  # (R, T, L, S)
    keep = ((div[:, None] < 0) | (trace.steps[None, :] <= div[:, None]))  # (R, T) up to and including it
    keep_rows = np.repeat(keep.reshape(-1), L)
    # Built as arrow columns from numpy (strings as dictionary indices, cast once in C++): no Python
    # objects per row, so a group of 1,000 runs x 200 steps x 11 layers costs milliseconds, not seconds.
    run_idx = np.repeat(np.arange(R, dtype=np.int32), T * L)[keep_rows]
    kinds = sorted({la.kind for la in lays})
    kind_idx = np.tile(np.array([kinds.index(la.kind) for la in lays], dtype=np.int32), R * T)[keep_rows]
    name_idx = np.tile(np.arange(L, dtype=np.int32), R * T)[keep_rows]
    cols: dict[str, Any] = {
        "run_id": pa.DictionaryArray.from_arrays(run_idx, pa.array(list(run_ids), pa.string())).cast(pa.string()),
        "step": np.tile(np.repeat(trace.steps, L), R)[keep_rows],
        "layer": np.tile(np.array([la.index for la in lays], dtype=np.int64), R * T)[keep_rows],
        "kind": pa.DictionaryArray.from_arrays(kind_idx, pa.array(kinds)).cast(pa.string()),
        "layer_name": pa.DictionaryArray.from_arrays(name_idx, pa.array([la.name for la in lays])).cast(pa.string()),
        "loss": np.repeat(trace.loss.T.reshape(-1), L)[keep_rows],
        "grad_norm": np.repeat(trace.grad_norm.T.reshape(-1), L)[keep_rows],
        "clipped": np.repeat(trace.clipped.T.reshape(-1), L)[keep_rows],
        "sharpness": (pa.nulls(int(keep_rows.sum()), pa.float64()) if trace.sharpness is None else
                      pa.array(np.repeat(trace.sharpness.T.reshape(-1), L)[keep_rows], from_pandas=True)),
    }
    flat = lay.reshape(R * T * L, len(LAYER_STATS))[keep_rows]
    for name, i in _STAT.items():
        cols[name] = (flat[:, i].astype(np.int64) if name == "wgrad_nonfinite"
                      else np.ascontiguousarray(flat[:, i], dtype=np.float64))
    return pa.table({k: cols[k] for k in STEP_COLUMNS}, schema=STEPS_SCHEMA)


def _grad_ratios(trace: GroupTrace, lays: list, weights: list[int], h: np.ndarray,
                 valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The log10 first-over-last ratios of the backprop and weight-gradient norms, (T, R) each, and their medians
    over each run's valid steps, (R,) each."""
    w = trace.layer[:, :, :, _STAT["wgrad_norm"]].astype(np.float64)
    first, last = _ends(trace, lays, weights, _STAT["out_rms"])  # (R,): linear1 and the readout, or a module's
    runs_ = np.arange(h.shape[1])
    ratio_t = _log10_ratio(h[:, runs_, first], h[:, runs_, last])  # (T, R)
    wratio_t = _log10_ratio(w[:, runs_, first], w[:, runs_, last])
    with warnings.catch_warnings():  # all-NaN columns (a run diverged at step 0) are legitimate NaN results
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(np.where(valid, ratio_t, np.nan), axis=0)
        wmedian = np.nanmedian(np.where(valid, wratio_t, np.nan), axis=0)
    return ratio_t, wratio_t, median, wmedian


def _min_loss(trace: GroupTrace, valid: np.ndarray) -> np.ndarray:
    """Per run, the least finite loss over its valid steps and its final loss; NaN where none is finite."""
    with warnings.catch_warnings():  # all-NaN columns (a run diverged at step 0) are legitimate NaN results
        warnings.simplefilter("ignore", RuntimeWarning)
        losses = np.where(valid & np.isfinite(trace.loss), trace.loss, np.nan)
        final_ok = np.where(np.isfinite(trace.final_loss), trace.final_loss, np.nan)
        return np.nanmin(np.vstack([losses, final_ok[None, :]]), axis=0)


def _dead(cfgs: list[RunCfg], trace: GroupTrace, lays: list, weights: list[int], h: np.ndarray,
          valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per run, the step and layer number where its backprop signal died (-1 where it did not)."""
    if lays[0].path is not None:  # a module: the layers some run called (MHA's out_proj, used by weight, is not)
        seen = np.isfinite(trace.layer[..., _STAT["out_rms"]]).any(axis=(0, 1))
        weights = [k for k in weights if seen[k]] or weights
    return dead_runs(h[:, :, weights], trace.steps, valid, np.array([lays[k].index for k in weights]),
                     underflow_floor(cfgs[0].train.dtype))


@dataclass(frozen=True)
class _RunStats:
    """A group's summary arrays for the runs table, one entry per run (R runs, T logged steps)."""

    min_loss: np.ndarray
    ratio_t: np.ndarray
    """(T, R) log10 of the first over the last layer's backprop signal; ``wratio_t`` the same for weight gradients."""
    wratio_t: np.ndarray
    median: np.ndarray
    """The medians of ``ratio_t`` and ``wratio_t`` over each run's steps before divergence."""
    wmedian: np.ndarray
    drop: np.ndarray
    dead_step: np.ndarray
    dead_layer: np.ndarray
    init_verdict: np.ndarray
    verdict: np.ndarray
    phase: np.ndarray


def _run_stats(cfgs: list[RunCfg], trace: GroupTrace, lays: list) -> _RunStats:
    """The group's per-run losses, gradient ratios, dead signal and verdicts."""
    div = trace.diverged_step
    valid = (div[None, :] < 0) | (trace.steps[:, None] < div[None, :])  # (T, R) steps before divergence
    weights = [k for k, la in enumerate(lays) if la.kind in ("linear", "conv")]
    h = trace.layer[:, :, :, _STAT["hgrad_norm"]].astype(np.float64)  # (T, R, L); float32 where the group trained in it
    ratio_t, wratio_t, median, wmedian = _grad_ratios(trace, lays, weights, h, valid)
    dead_step, dead_layer = _dead(cfgs, trace, lays, weights, h, valid)
    baseline = np.full(trace.loss.shape[1], trace.baseline_loss)
    cond = conditions(ratio_t[0], median, trace.final_loss, baseline,
                      *(np.array([getattr(c.verdict, k) for c in cfgs]) for k in ("vanish_below", "explode_above",
                                                                                    "stall_margin")))
    verdict, init_verdict = verdicts(div >= 0, dead_step >= 0, cond)
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = np.log10(trace.loss[0] / trace.final_loss)
    full_batch = np.array([c.train.full_batch(c.data.n_samples) for c in cfgs])
    phase = phases(trace.loss, valid, trace.final_loss, div >= 0, full_batch)
    return _RunStats(_min_loss(trace, valid), ratio_t, wratio_t, median, wmedian, drop, dead_step, dead_layer,
                     init_verdict, verdict, phase)


def _sharpness(r: int, cfg: RunCfg, trace: GroupTrace) -> dict[str, Any]:
    """Run r's sharpness columns and the learning-rate edge they predict (null where nothing was measured)."""
    measured = trace.sharpness is not None
    init = float(trace.sharpness[0, r]) if measured else float("nan")
    edge, note = lr_edge(cfg.optim, init)
    return {
        "sharpness_init": init if measured else None,
        "sharpness_iters": int(trace.sharpness_iters[r]) if measured else None,
        "sharpness_converged": bool(trace.sharpness_converged[r]) if measured else None,
        "sharpness_final": float(trace.sharpness_final[r]) if measured else None,
        "lr_edge_pred": edge,
        "lr_edge_note": note,
        "lr_over_edge": cfg.optim.lr / edge,
    }


def _run_row(r: int, cfg: RunCfg, run_id: str, meta: dict[str, Any], trace: GroupTrace, s: _RunStats,
             predictions: dict[tuple, Any]) -> dict[str, Any]:
    """Run r's row of the runs table, its columns in the table's order."""
    div = trace.diverged_step[r]
    dead = s.dead_step[r] >= 0
    return {
        "run_id": run_id,
        "job_num": meta.get("job_num"),
        "override_dirname": meta.get("override_dirname", ""),
        **flatten(cfg),
        "device": trace.device,
        "initial_loss": trace.loss[0, r],
        "final_loss": trace.final_loss[r],
        "min_loss": s.min_loss[r],
        "test_loss": trace.test_loss[r],
        "test_accuracy": trace.test_accuracy[r],
        "diverged_step": int(div) if div >= 0 else None,
        "diverged_reason": trace.diverged_reason[r],
        "grad_ratio_log10": s.ratio_t[0, r],
        "grad_ratio_log10_median": s.median[r],
        "wgrad_ratio_log10": s.wratio_t[0, r],
        "wgrad_ratio_log10_median": s.wmedian[r],
        **_prediction(cfg, trace, predictions),
        "baseline_loss": trace.baseline_loss,
        "loss_drop_log10": s.drop[r],
        "dead_step": int(s.dead_step[r]) if dead else None,
        "dead_layer": int(s.dead_layer[r]) if dead else None,
        "init_verdict": s.init_verdict[r],
        "verdict": s.verdict[r],
        **_sharpness(r, cfg, trace),
        "phase": s.phase[r],
        "wall_s": trace.wall_s,
        "group_size": trace.loss.shape[1],
    }


def _nullable_ints(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with its integer columns as pandas Int64 (nullable), the same as load_sweep returns."""
    known = {**ID_COLUMNS, **config_columns(), **RESULT_COLUMNS}
    for col in runs.columns:
        if known.get(col) == pa.int64():
            runs[col] = runs[col].astype("Int64")
    return runs


def build_tables(cfgs: list[RunCfg], trace: GroupTrace, meta: list[dict[str, Any]] | None = None,
                 arrow: bool = False) -> tuple[pd.DataFrame, Any]:
    """The runs and steps tables of a trained group.

    ``meta[r]`` may give ``job_num`` and ``override_dirname`` for run r. The steps table is a pandas
    DataFrame, or with ``arrow`` the ``pyarrow.Table`` that ``write_group`` writes without converting.
    """
    lays = trace.layers or layers(cfgs[0].model)
    run_ids = np.array([config_hash(c) for c in cfgs], dtype=object)
    steps = _steps_table(trace, lays, run_ids)
    stats = _run_stats(cfgs, trace, lays)
    meta = meta or [{} for _ in cfgs]
    predictions: dict[tuple, Any] = {}  # shared by the group's runs (see _prediction)
    runs = pd.DataFrame([_run_row(r, cfg, run_ids[r], meta[r], trace, stats, predictions)
                         for r, cfg in enumerate(cfgs)])
    return _nullable_ints(runs), (steps if arrow else steps.to_pandas())
