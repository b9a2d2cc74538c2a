"""A trained group's trace summarised into its runs and steps tables: ratios, medians, verdicts and the
mean-field prediction (the one place that calls ``gradsweep.theory``). The schema is ``gradsweep.schema``'s."""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from gradsweep.config import RunCfg
from gradsweep.identity import as_tuple, config_hash, flatten
from gradsweep.model import layers
from gradsweep.schema import (
    ID_COLUMNS,
    LAYER_STATS,
    RESULT_COLUMNS,
    STEP_COLUMNS,
    STEPS_SCHEMA,
    config_columns,
)
from gradsweep.theory import predict
from gradsweep.verdicts import conditions, dead_runs, underflow_floor, verdicts

if TYPE_CHECKING:
    from gradsweep.train import GroupTrace


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


def build_tables(cfgs: list[RunCfg], trace: GroupTrace, meta: list[dict[str, Any]] | None = None,
                 arrow: bool = False) -> tuple[pd.DataFrame, Any]:
    """The runs and steps tables of a trained group.

    ``meta[r]`` may give ``job_num`` and ``override_dirname`` for run r. The steps table is a pandas
    DataFrame, or with ``arrow`` the ``pyarrow.Table`` that ``write_group`` writes without converting.
    """
    lays = trace.layers or layers(cfgs[0].model)
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
    }
    flat = lay.reshape(R * T * L, len(LAYER_STATS))[keep_rows]
    for name, i in S.items():
        cols[name] = (flat[:, i].astype(np.int64) if name == "wgrad_nonfinite"
                      else np.ascontiguousarray(flat[:, i], dtype=np.float64))
    steps = pa.table({k: cols[k] for k in STEP_COLUMNS}, schema=STEPS_SCHEMA)

    weights = [k for k, la in enumerate(lays) if la.kind in ("linear", "conv")]
    h = trace.layer[:, :, :, S["hgrad_norm"]].astype(np.float64)  # (T, R, L); float32 where the group trained in it
    w = trace.layer[:, :, :, S["wgrad_norm"]].astype(np.float64)
    first, last = _ends(trace, lays, weights, S["out_rms"])  # (R,): linear1 and the readout, or a module's
    runs_ = np.arange(R)
    ratio_t = _log10_ratio(h[:, runs_, first], h[:, runs_, last])  # (T, R)
    wratio_t = _log10_ratio(w[:, runs_, first], w[:, runs_, last])
    with warnings.catch_warnings():  # all-NaN columns (a run diverged at step 0) are legitimate NaN results
        warnings.simplefilter("ignore", RuntimeWarning)
        median = np.nanmedian(np.where(valid, ratio_t, np.nan), axis=0)
        wmedian = np.nanmedian(np.where(valid, wratio_t, np.nan), axis=0)
        losses = np.where(valid & np.isfinite(trace.loss), trace.loss, np.nan)
        final_ok = np.where(np.isfinite(trace.final_loss), trace.final_loss, np.nan)
        min_loss = np.nanmin(np.vstack([losses, final_ok[None, :]]), axis=0)
    diverged = div >= 0
    if lays[0].path is not None:  # a module: the layers some run called (MHA's out_proj, used by weight, is not)
        seen = np.isfinite(trace.layer[..., S["out_rms"]]).any(axis=(0, 1))
        weights = [k for k in weights if seen[k]] or weights
    dead_step, dead_layer = dead_runs(h[:, :, weights], trace.steps, valid, np.array([lays[k].index for k in weights]),
                                      underflow_floor(cfgs[0].train.dtype))
    baseline = np.full(R, trace.baseline_loss)
    cond = conditions(ratio_t[0], median, trace.final_loss, baseline,
                      *(np.array([getattr(c.verdict, k) for c in cfgs]) for k in ("vanish_below", "explode_above",
                                                                                    "stall_margin")))
    verdict, init_verdict = verdicts(diverged, dead_step >= 0, cond)
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = np.log10(trace.loss[0] / trace.final_loss)
    meta = meta or [{} for _ in cfgs]
    rows, predictions = [], {}
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
            **_prediction(cfg, trace, predictions),
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
