"""Which config keys a sweep varied, how to lay them out, and the per-cell aggregates over seeds.

Pure pandas on the runs table, so the report's decisions can be tested without drawing anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from gradsweep.results.schema import ID_COLUMNS, RESULT_COLUMNS
from gradsweep.results.verdicts import SEVERITY

REPLICATE_KEYS = ("train.seed",)  # aggregated over, never an axis
PREFERRED_X = "model.depth"
PREFERRED_Y = ("init", "model.activation", "model.norm", "optim.name", "data")  # in this order, before other categoricals
STATISTICS = {
    # name: (column, human label)
    "grad_ratio": ("grad_ratio_log10", "log10 |dL/dh| first Linear / last Linear"),
    "wgrad_ratio": ("wgrad_ratio_log10", "log10 |dL/dW| first Linear / last Linear"),
}
AT = {"init": "", "training": "_median"}  # the statistic at step 0, or its median over training
# Keys that cannot change anything measured at step 0 (before the first update): a step-0 figure is not split by them.
STEP0_BLIND = ("optim", "train.steps", "train.clip_norm", "train.log_every", "verdict", "quiet", "engine")


def config_keys(runs: pd.DataFrame) -> list[str]:
    """The columns of ``runs`` that are config values (``+key`` tags included), in table order."""
    not_config = {*ID_COLUMNS, *RESULT_COLUMNS, "run_dir"}
    return [c for c in runs.columns if c not in not_config]


def _determines(runs: pd.DataFrame, a: str, b: str) -> bool:
    """True when every value of column ``a`` comes with a single value of column ``b``."""
    return bool((runs.groupby(a, dropna=False)[b].nunique(dropna=False) <= 1).all())


def swept_keys(runs: pd.DataFrame) -> list[str]:
    """Config keys that take more than one value, without replicate keys and without keys that merely
    follow another swept key (``init.scheme`` follows ``init``)."""
    varied = [k for k in config_keys(runs) if k not in REPLICATE_KEYS and runs[k].nunique(dropna=False) > 1]
    keep: list[str] = []
    for k in varied:
        # A key that another kept key determines adds nothing; of two that determine each other,
        # keep the shorter name (a preset like 'init' over its field 'init.scheme').
        if any(_determines(runs, j, k) for j in keep):
            continue
        keep = [j for j in keep if not (_determines(runs, k, j) and len(k) < len(j))] + [k]
    return [k for k in varied if k in keep]


def is_numeric(runs: pd.DataFrame, key: str) -> bool:
    return pd.api.types.is_numeric_dtype(runs[key]) and not pd.api.types.is_bool_dtype(runs[key])


@dataclass
class Layout:
    """Where each swept key goes in the heatmaps."""

    x: str | None
    y: str | None
    facets: list[str] = field(default_factory=list)
    order: dict[str, list[str]] = field(default_factory=dict)
    """Per key, its values in the order the sweep's command gave them (as text); others sort naturally."""

    @property
    def keys(self) -> list[str]:
        return [k for k in (self.x, self.y, *self.facets) if k is not None]

    def at_step0(self) -> tuple[Layout, list[str]]:
        """This layout without the keys a step-0 quantity cannot depend on (``STEP0_BLIND``), and those keys."""
        def blind(k: str | None) -> bool:
            return k is not None and any(k == b or k.startswith(b + ".") for b in STEP0_BLIND)

        dropped = [k for k in self.keys if blind(k)]
        return Layout(None if blind(self.x) else self.x, None if blind(self.y) else self.y,
                      [f for f in self.facets if not blind(f)], self.order), dropped

    def rank(self, key: str, value: object) -> tuple:
        """Sort key of a value on ``key``'s axis: command order where known, else numbers before text."""
        listed = self.order.get(key, [])
        text = value_text(value)
        if text in listed:
            return (0, listed.index(text), "")
        return (1, 0, value) if isinstance(value, (int, float, np.number)) else (2, 0, text)


def value_text(value: object) -> str:
    """A value as the command line writes it: 0.01, relu, null."""
    if value is None or value is pd.NA or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return "null"
    return f"{float(value):g}" if isinstance(value, (float, np.floating)) else str(value)


def infer_layout(runs: pd.DataFrame, x: str | None = None, y: str | None = None,
                 facets: list[str] | None = None, order: dict[str, list[str]] | None = None) -> Layout:
    """``model.depth`` (or the first numeric swept key) on x, a categorical key on y, the rest as facets.

    Any of x, y, facets given by the caller wins; the rest is filled from the swept keys left over.
    """
    swept = swept_keys(runs)
    for key in (x, y, *(facets or [])):
        if key is not None and key not in runs.columns:
            raise ValueError(f"{key!r} is not a column of this sweep; swept keys: {', '.join(swept) or '(none)'}")
    taken = {k for k in (x, y, *(facets or [])) if k}
    free = [k for k in swept if k not in taken]
    if x is None and free:
        numeric = [k for k in free if is_numeric(runs, k)]
        x = PREFERRED_X if PREFERRED_X in free else (numeric[0] if numeric else free[0])
        free.remove(x)
    if y is None and free:
        categorical = [k for k in free if not is_numeric(runs, k)]
        categorical.sort(key=lambda k: PREFERRED_Y.index(k) if k in PREFERRED_Y else len(PREFERRED_Y))
        y = categorical[0] if categorical else free[0]
        free.remove(y)
    return Layout(x, y, list(facets) if facets is not None else free, dict(order or {}))


def facet_labels(df: pd.DataFrame, keys: list[str]) -> pd.Series:
    """'k1=v1, k2=v2' for every row, built column-wise (no Python loop over rows)."""
    if not keys:
        return pd.Series("", index=df.index)
    parts = [k + "=" + df[k].astype(object).where(df[k].notna(), "null").map(str) for k in keys]
    label = parts[0]
    for part in parts[1:]:
        label = label + ", " + part
    return label


def aggregate(runs: pd.DataFrame, layout: Layout, column: str, step0: bool = False) -> pd.DataFrame:
    """One row per cell (x, y, facets): the median of ``column`` over the cell's non-diverged runs (``step0``: over
    all its runs, a quantity measured before any update, which a later divergence does not touch), how many runs
    and how many diverged, and the cell's verdict (the most common, ties to the worse); ``at_baseline`` where the
    value is no better than the data's baseline loss (the stall line: ``(1 - verdict.stall_margin) * baseline``)."""
    keys = layout.keys
    df = runs.copy()
    df["_diverged"] = df["verdict"] == "diverged"
    df["_value"] = df[column].astype(float) if step0 else np.where(df["_diverged"], np.nan, df[column].astype(float))
    has_base = "baseline_loss" in df.columns and "verdict.stall_margin" in df.columns
    df["_line"] = (1 - df["verdict.stall_margin"].astype(float)) * df["baseline_loss"].astype(float) if has_base else np.nan
    if not keys:
        df["_all"] = "all runs"
        keys = ["_all"]
    grouped = df.groupby(keys, dropna=False, sort=True)
    out = grouped.agg(value=("_value", _median), n=("verdict", "size"), n_diverged=("_diverged", "sum"),
                      stall_line=("_line", _median)).reset_index()
    with np.errstate(invalid="ignore"):
        out["at_baseline"] = out["value"] >= out["stall_line"]  # NaN either side: False
    out["verdict"] = grouped["verdict"].agg(_cell_verdict).to_numpy()
    out["facet"] = facet_labels(out, layout.facets)
    if layout.facets:  # panels in the command's order
        ranks = [out[k].map(lambda v, k=k: layout.rank(k, v)) for k in layout.facets]
        out = out.iloc[sorted(range(len(out)), key=lambda i: tuple(r.iloc[i] for r in ranks))].reset_index(drop=True)
    return out


def _median(s: pd.Series) -> float:
    v = s.to_numpy(dtype=float)
    v = v[~np.isnan(v)]
    return float(np.median(v)) if v.size else float("nan")


def _cell_verdict(s: pd.Series) -> str:
    counts = s.value_counts()
    top = counts.max()
    return max((v for v in counts.index if counts[v] == top), key=lambda v: SEVERITY.get(v, -1))
