"""The curvature figures: sharpness through training against the 2 / lr lines (Cohen et al. 2021, Figure 1, on
the sweep's own nets), and the heatmap of lr over its predicted edge with each cell's phase."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from gradsweep.report.figures.heatmaps import _pivot, cell_axes  # noqa: E402
from gradsweep.report.figures.style import MAX_WIDTH_IN, MISSING_FACE, _fmt, _grid, _ink, _wrap  # noqa: E402
from gradsweep.report.layout import Layout  # noqa: E402

# lr / lr_edge_pred in factor-of-two bins around 1: below the edge blue, past it red (log scale, symmetric).
EDGE_BINS = (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)
PHASE_MARK = {"monotone": "", "catapult": "catapult", "diverged": "diverged", "not_full_batch": "minibatch"}


def sharpness_curves(trace: pd.DataFrame, lines: pd.DataFrame, panel_titles: list[str]) -> plt.Figure:
    """Loss (top) and sharpness (bottom) against step, one column per panel, one line per learning rate, each lr's
    2 / lr as a dashed line in its colour. ``trace``: run_id, step, loss, sharpness (NaN where not measured);
    ``lines``: one row per drawn run with run_id, panel (an index into ``panel_titles``), lr, diverged_step."""
    n = len(panel_titles)
    fig, axes = plt.subplots(2, n, figsize=(min(max(4.2 * n, 6.4) + 1.6, MAX_WIDTH_IN), 6.4), squeeze=False,
                             sharex="col",
                             layout="constrained")
    lrs = sorted(lines["lr"].unique())
    palette = dict(zip(lrs, sns.color_palette("viridis" if len(lrs) > 8 else "colorblind", len(lrs))))
    edges = 2 / np.asarray(lrs, dtype=float)
    measured = trace["sharpness"].to_numpy(dtype=float)
    finite = measured[np.isfinite(measured) & (measured > 0)]
    # the axis holds every 2 / lr line and the measured values up to 3x the largest line (a diverging run's 1e14
    # is clipped to the top edge rather than flattening the rest)
    lo = min(edges.min(), finite.min() if finite.size else edges.min()) / 1.5
    hi = min(max(edges.max(), finite.max() if finite.size else 0), 3 * edges.max()) * 1.5
    for p, title in enumerate(panel_titles):
        top, bottom = axes[0][p], axes[1][p]
        for lr in lrs:
            colour = palette[lr]
            bottom.axhline(2 / lr, color=colour, lw=1.0, ls="--")
            for _, line in lines[(lines["panel"] == p) & (lines["lr"] == lr)].iterrows():
                one = trace[trace["run_id"] == line["run_id"]]
                top.plot(one["step"], one["loss"], color=colour, lw=1.3)
                s = one[np.isfinite(one["sharpness"].to_numpy(dtype=float))]
                bottom.plot(s["step"], s["sharpness"].clip(upper=hi), color=colour, lw=1.3, marker=".", ms=3)
                if line["diverged_step"] >= 0:  # at the top edge, where its record ends
                    top.plot([one["step"].max()], [1.0], "x", color=colour, ms=8, mew=2, clip_on=False,
                             transform=top.get_xaxis_transform())
        loss = trace.loc[trace["run_id"].isin(lines.loc[lines["panel"] == p, "run_id"]), "loss"].to_numpy(dtype=float)
        ok = loss[np.isfinite(loss) & (loss > 0)]
        if ok.size:
            top.set_yscale("log")
            top.set_ylim(ok.min() / 1.5, min(ok.max(), 3 * np.percentile(ok, 99)) * 1.5)
        bottom.set_yscale("log")
        bottom.set_ylim(lo, hi)
        for ax in (top, bottom):  # plain numbers (20, 50, 200), not 2 x 10^1
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if f"{v:g}"[0] in "25" else ""))
        top.set_title(title, fontsize=10)
        top.set_ylabel("training loss" if p == 0 else "")
        bottom.set_ylabel("sharpness (top Hessian eigenvalue)" if p == 0 else "")
        bottom.set_xlabel("step")
    handles = [Line2D([], [], color=palette[lr], lw=1.6, label=f"lr {_fmt(lr)}") for lr in lrs]
    handles += [Line2D([], [], color="#555555", ls="--", lw=1.0, label="2 / lr, its colour"),
                Line2D([], [], color="#555555", ls="", marker="x", ms=7, mew=2, label="diverged")]
    fig.legend(handles=handles, loc="outside right center", fontsize=9, frameon=False)
    title = ("Sharpness through training against 2 / lr: full-batch gradient descent drives it up to 2 / lr and "
             "holds it there (the edge of stability, Cohen et al. 2021)")
    fig.suptitle(_wrap(title, max(30, int(fig.get_figwidth() * 72 / (11 * 0.55)))), fontsize=11)
    return fig


def edge_heatmap(cells: pd.DataFrame, layout: Layout, title: str) -> plt.Figure:
    """Each cell coloured by its median lr / lr_edge_pred (``value``), labelled with it and its phase: the most
    common phase over the cell's runs (``phase``), with a count where the runs differ (``phase_n`` of ``n``)."""
    cells, x_values, y_values, panels = cell_axes(cells, layout)
    nx, ny = len(x_values), len(y_values)
    fig, axes = _grid(len(panels), panel_w=max(3.0, 0.62 * nx + 1.3), panel_h=max(2.0, 0.5 * ny + 1.3), extra_w=3.0)
    cmap = mcolors.ListedColormap([plt.get_cmap("RdBu_r")(v) for v in (0.05, 0.2, 0.35, 0.65, 0.8, 0.95)]) \
        .with_extremes(under=plt.get_cmap("RdBu_r")(0.0), over=plt.get_cmap("RdBu_r")(1.0))
    norm = mcolors.BoundaryNorm(np.log10(EDGE_BINS), cmap.N)
    fontsize = 10 if nx * ny <= 40 else 9 if nx * ny <= 150 else 8
    mesh = None
    for ax, (facet, panel) in zip(axes, panels):
        grid = np.log10(_pivot(panel, layout, "value", x_values, y_values).to_numpy(dtype=float))
        phase = _pivot(panel, layout, "phase", x_values, y_values).to_numpy()
        count = _pivot(panel, layout, "phase_n", x_values, y_values).to_numpy()
        n = _pivot(panel, layout, "n", x_values, y_values).to_numpy()
        ax.set_facecolor(MISSING_FACE)
        mesh = ax.pcolormesh(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, edgecolors="white", linewidth=1.0)
        for (i, j), g in np.ndenumerate(grid):
            if pd.isna(n[i, j]) or nx * ny > 600:
                continue
            words = PHASE_MARK.get(phase[i, j], str(phase[i, j]))
            if words and count[i, j] != n[i, j]:
                words += f" {int(count[i, j])}/{int(n[i, j])}"
            text = (f"{10 ** g:.2g}x" if np.isfinite(g) else "no edge") + (f"\n{words}" if words else "")
            rgba = mesh.to_rgba(g) if np.isfinite(g) else (1, 1, 1, 1)
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=fontsize, color=_ink(rgba),
                    in_layout=False)
        labels = [_fmt(v) for v in x_values]
        ax.set_xticks(np.arange(nx) + 0.5, labels, rotation=90 if nx * max(map(len, labels)) > 60 else 0)
        ax.set_yticks(np.arange(ny) + 0.5, [_fmt(v) for v in y_values])
        ax.set_xlabel(layout.x or "")
        ax.set_ylabel(layout.y or "")
        ax.set_xlim(0, nx)
        ax.set_ylim(ny, 0)
        ax.set_title(facet, fontsize=10)
    bar = fig.colorbar(mesh, ax=axes, shrink=0.95, pad=0.02, aspect=25, extend="both")
    bar.set_ticks(np.log10(EDGE_BINS), labels=[f"{b:g}x" + (" = 2/lambda_0" if b == 1 else "") for b in EDGE_BINS],
                  fontsize=8)
    bar.ax.axhline(0.0, color="black", lw=1.6)
    bar.set_label("lr / lr_edge_pred\n<- below the edge      past it ->", fontsize=9)
    width = max(30, int(fig.get_figwidth() * 72 / (11 * 0.55)))
    fig.suptitle("\n".join(_wrap(line, width) for line in title.split("\n")), fontsize=11)
    fig.gradsweep_info = {"kind": "edge", "x": layout.x, "y": layout.y, "facets": list(layout.facets),
                          "colour": [float(b) for b in EDGE_BINS]}
    return fig
