"""The report's curvature section: where the sweep measured the sharpness, the heatmap of each cell's learning
rate over its predicted edge (with the phase gradient descent went through), and, where it measured it through
training, the sharpness against the 2 / lr lines."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from gradsweep.errors import first_line
from gradsweep.report.layout import Layout, aggregate, facet_labels
from gradsweep.report.sweepdirs import ReportError
from gradsweep.results.store import load_steps

LR_KEY = "optim.lr"
MAX_PANELS = 3
"""Sharpness panels at most (one per combination of the swept keys besides the learning rate), left to right in
the command's order."""
MIN_POINTS = 3
"""A run's sharpness is drawn through training where it was measured at this many logged steps or more."""


def edge_figures(save, runs: pd.DataFrame, layout: Layout, sweep_dir: Path) -> None:
    """Add the curvature figures to the report, where the runs have a predicted edge (v3 tables with
    stats.sharpness)."""
    from gradsweep.report.figures.edge import edge_heatmap

    ratio = runs["lr_over_edge"].astype(float) if "lr_over_edge" in runs else pd.Series([], dtype=float)
    if not np.isfinite(ratio).any():
        return
    cells = _edge_cells(runs, layout)
    below = runs[ratio < 1]
    monotone = int((below["phase"] == "monotone").sum())
    save(edge_heatmap(cells, layout, "Learning rate over its predicted edge 2 / lambda_0, and the phase it went "
                                     "through (median over seeds)"),
         "heatmap_edge.png", "Learning rate over the predicted edge",
         "lr / lr_edge_pred per cell, where lr_edge_pred = 2 (1 + momentum) / (lambda_0 + weight_decay) and lambda_0 "
         "is the sharpness (the top eigenvalue of the training loss's Hessian) at step 0: gradient descent on a "
         "quadratic is stable below it. On a net, past it a run first spikes and then converges (catapult) or "
         "diverges. Each cell's most common phase, with its count where runs differ: monotone (unlabelled) - the "
         "loss never rose above its initial value; catapult - it rose more than 1% above it, then ended below it; "
         "diverged; minibatch - not full batch, where the phases do not apply. "
         f"Of the {len(below)} runs below the edge, {monotone} were monotone.")
    _sharpness_figure(save, runs, layout, sweep_dir)


def _edge_cells(runs: pd.DataFrame, layout: Layout) -> pd.DataFrame:
    """layout.aggregate's cells of lr_over_edge (over all runs: a prediction made before training), with each
    cell's most common phase and how many of its runs went through it."""
    cells = aggregate(runs, layout, "lr_over_edge", step0=True)
    keys = layout.keys
    df = runs.assign(_all="all runs")
    by = keys or ["_all"]
    mode = (df.groupby([*by, "phase"], dropna=False).size().rename("phase_n").reset_index()
            .sort_values("phase_n", ascending=False, kind="stable").drop_duplicates(by))
    if not keys:
        cells = cells.assign(_all="all runs")
    return cells.merge(mode, on=by, how="left")


def _sharpness_figure(save, runs: pd.DataFrame, layout: Layout, sweep_dir: Path) -> None:
    from gradsweep.report.figures.edge import sharpness_curves

    try:
        trace = load_steps(sweep_dir, ["run_id", "step", "loss", "sharpness"], pc.field("layer") == 1,
                           run_ids=runs["run_id"].tolist())
    except (pa.ArrowException, OSError) as e:
        raise ReportError(f"{sweep_dir}: a steps table cannot be read ({first_line(e)})") from None
    points = trace.groupby("run_id")["sharpness"].count()
    through = runs[runs["run_id"].map(points).fillna(0) >= MIN_POINTS]
    if through.empty:
        return
    other = [k for k in layout.keys if k != LR_KEY]
    through = through.assign(_panel=facet_labels(through, other) if other else "")
    order = list(dict.fromkeys(through.sort_values(other, key=lambda s: s.map(lambda v: layout.rank(s.name, v)),
                                                   kind="stable")["_panel"])) if other else [""]
    shown = order[:MAX_PANELS]
    seed = "train.seed" if "train.seed" in through else None
    picked = through[through["_panel"].isin(shown)]
    picked = (picked.sort_values(seed, kind="stable") if seed else picked).drop_duplicates(["_panel", LR_KEY])
    lines = pd.DataFrame({"run_id": picked["run_id"].to_numpy(), "panel": picked["_panel"].map(shown.index).to_numpy(),
                          "lr": picked[LR_KEY].astype(float).to_numpy(),
                          "diverged_step": picked["diverged_step"].fillna(-1).astype(int).to_numpy()})
    fig = sharpness_curves(trace[trace["run_id"].isin(lines["run_id"])], lines, shown)
    left = f"; {len(order) - len(shown)} more combinations of {', '.join(other)} are not drawn" \
        if len(order) > len(shown) else ""
    save(fig, "sharpness.png", "Sharpness through training",
         "One run per learning rate (its lowest seed) and panel: the training loss above, the sharpness (the top "
         "eigenvalue of the loss's Hessian, measured every stats.sharpness_every logged steps) below, with 2 / lr "
         "dashed in the same colour. Gradient descent cannot rest where the sharpness exceeds 2 / lr: under full "
         "batch it rises to that line and hovers there while the loss keeps falling, non-monotonically (Cohen et "
         f"al. 2021, Figure 1){left}.")
