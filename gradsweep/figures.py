"""The report's figures: where-it-breaks heatmaps, gradient-flow maps, loss curves.

Every function takes already aggregated frames (no per-run Python loops over rows) and returns a
matplotlib Figure; the caller saves it.
"""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from gradsweep.layout import Layout  # noqa: E402
from gradsweep.verdicts import VERDICTS  # noqa: E402

# Okabe-Ito, safe for the common colour-vision deficiencies.
VERDICT_COLORS = {"healthy": "#009E73", "stalled": "#E69F00", "vanishing": "#0072B2", "exploding": "#D55E00",
                  "dead": "#CC79A7", "diverged": "#4D4D4D"}
RATIO_CMAP = "RdBu_r"  # ColorBrewer diverging, colour-blind safe: blue = vanishing, red = exploding
DIVERGED_FACE = "#4D4D4D"
MISSING_FACE = "#F0F0F0"
ZERO_SIGNAL = "#56B4E9"  # Okabe-Ito sky blue: outside magma, so a zero signal never reads as a small one
UNDERFLOW_COLOR = "#009E73"  # Okabe-Ito bluish green: a zero that is float underflow, not a cut
MAX_ANNOTATED_CELLS = 600  # per panel; beyond it the colours speak alone


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{v:g}"
    return str(v)


def _panels(cells: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    if (cells["facet"] == "").all():
        return [("", cells)]
    return list(cells.groupby("facet", sort=False))


MAX_WIDTH_IN = 12.2  # at the report's 110 dpi, 1,342 px: the page's width at 1400 px, so no figure is scaled down


def _grid(n: int, panel_w: float, panel_h: float, extra_w: float = 0.0) -> tuple[plt.Figure, list[plt.Axes]]:
    """Panels in as many columns (up to 3) as fit MAX_WIDTH_IN; more rows instead of smaller text."""
    panel_w = min(panel_w, MAX_WIDTH_IN - extra_w)
    ncols = max(1, min(n, 3, int((MAX_WIDTH_IN - extra_w) // panel_w)))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols + extra_w, panel_h * nrows + 1.0),
                             squeeze=False, layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _pivot(panel: pd.DataFrame, layout: Layout, col: str, x_values, y_values) -> pd.DataFrame:
    xs = panel[layout.x] if layout.x else pd.Series("all runs", index=panel.index)
    ys = panel[layout.y] if layout.y else pd.Series("all runs", index=panel.index)
    table = pd.DataFrame({"x": xs.to_numpy(), "y": ys.to_numpy(), "v": panel[col].to_numpy()})
    return table.pivot_table(index="y", columns="x", values="v", aggfunc="first", dropna=False).reindex(
        index=y_values, columns=x_values)


def _axis_values(cells: pd.DataFrame, key: str | None, layout: Layout) -> list:
    if key is None:
        return ["all runs"]
    values = cells[key].dropna().unique().tolist()
    return sorted(values, key=lambda v: layout.rank(key, v)) + (["null"] if cells[key].isna().any() else [])


def ratio_scale(vanish: float, explode: float) -> tuple[mcolors.Colormap, mcolors.Normalize, list[float]]:
    """The one colour scale of every gradient-ratio figure (measured at step 0, through training, predicted):
    fixed and symmetric, in steps whose edges include the verdict thresholds, light inside them and dark beyond,
    so that -2.25 (vanishing) and -1.88 (healthy) never share a colour. Values beyond the ends take the end colours.
    """
    # Symmetric for the default thresholds (+-2); with other ones each side keeps its own threshold as an edge.
    edges = [3 * vanish, 2 * vanish, vanish, vanish / 2, vanish / 4, explode / 4, explode / 2, explode, 2 * explode,
             3 * explode]
    base = plt.get_cmap(RATIO_CMAP)
    # blues for the negative bins, reds for the positive; the healthy bins (|x| < t) stay pale
    shades = [0.0, 0.1, 0.3, 0.38, 0.5, 0.62, 0.7, 0.9, 1.0]
    cmap = mcolors.ListedColormap([base(v) for v in shades]).with_extremes(under=base(0.0), over=base(1.0))
    return cmap, mcolors.BoundaryNorm(edges, cmap.N), edges


def heatmap(cells: pd.DataFrame, layout: Layout, kind: str, title: str, label: str = "",
            vanish: float = -2.0, explode: float = 2.0, baseline_words: str = "", step0: bool = False) -> plt.Figure:
    """A where-it-breaks heatmap of aggregated ``cells`` (layout.aggregate): kind = ratio, loss, accuracy or verdict.

    ``step0``: the values were measured before any update, so cells whose runs all diverged later keep their colour.
    """
    cells = cells.copy()
    for key in (layout.x, layout.y):
        if key is not None:
            cells[key] = cells[key].where(cells[key].notna(), "null")
    x_values, y_values = _axis_values(cells, layout.x, layout), _axis_values(cells, layout.y, layout)
    panels = _panels(cells)
    nx, ny = len(x_values), len(y_values)
    fig, axes = _grid(len(panels), panel_w=max(3.0, 0.62 * nx + 1.3), panel_h=max(2.0, 0.5 * ny + 1.3),
                      extra_w=0.5 if kind == "verdict" else 3.0)
    annotate = nx * ny <= MAX_ANNOTATED_CELLS
    same_n = cells["n"].nunique() == 1  # then the count goes in the title, not in every cell
    if same_n and int(cells["n"].iloc[0]) > 1:
        title += f" ({int(cells['n'].iloc[0])} runs per cell)"
    fontsize = 10 if nx * ny <= 40 else 9 if nx * ny <= 150 else 8

    finite = cells["value"].to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    if kind == "ratio":
        cmap, norm, ratio_edges = ratio_scale(vanish, explode)
        span = ratio_edges[-1]
    elif kind == "accuracy":
        cmap, norm = plt.get_cmap("viridis"), mcolors.Normalize(vmin=0.0, vmax=1.0)
    elif kind == "loss":
        pos = finite[finite > 0]
        lo, hi = (pos.min(), pos.max()) if pos.size else (1e-3, 1.0)
        if hi <= lo * 1.0001:
            lo, hi = lo / 2, hi * 2
        cmap, norm = plt.get_cmap("viridis"), mcolors.LogNorm(vmin=lo, vmax=hi)
    else:
        cmap = mcolors.ListedColormap([VERDICT_COLORS[v] for v in VERDICTS])
        norm = mcolors.BoundaryNorm(np.arange(-0.5, len(VERDICTS)), len(VERDICTS))

    mappable = None
    marked = False
    for ax, (facet, panel) in zip(axes, panels):
        values = _pivot(panel, layout, "value", x_values, y_values)
        verdicts = _pivot(panel, layout, "verdict", x_values, y_values)
        n = _pivot(panel, layout, "n", x_values, y_values)
        ndiv = _pivot(panel, layout, "n_diverged", x_values, y_values)
        if kind == "loss":
            at_base = _pivot(panel, layout, "at_baseline", x_values, y_values).fillna(False)
        if kind == "verdict":
            grid = verdicts.apply(lambda col: col.map({v: i for i, v in enumerate(VERDICTS)})).astype(float)
        else:
            grid = values.astype(float)
            if kind == "ratio":  # -inf (no signal at all reaches layer 1) drawn at the end of the scale, labelled
                grid = grid.clip(lower=-2 * span, upper=2 * span)
        ax.set_facecolor(MISSING_FACE)
        mappable = ax.pcolormesh(np.ma.masked_invalid(grid.to_numpy()), cmap=cmap, norm=norm, edgecolors="white",
                                 linewidth=1.0)
        for (i, j), verdict in np.ndenumerate(verdicts.to_numpy()):
            cell_n = n.to_numpy()[i, j]
            if pd.isna(cell_n):
                if annotate:
                    ax.text(j + 0.5, i + 0.5, "no run", ha="center", va="center", fontsize=fontsize, color="#777777",
                            in_layout=False)
                continue
            all_diverged = ndiv.to_numpy()[i, j] == cell_n and not step0
            if all_diverged and kind != "verdict":
                ax.add_patch(Rectangle((j, i), 1, 1, facecolor=DIVERGED_FACE, hatch="//", edgecolor="#BBBBBB", lw=0))
            if kind == "loss" and bool(at_base.to_numpy()[i, j]):
                marked = True
                ax.add_patch(Rectangle((j + 0.04, i + 0.04), 0.92, 0.92, fill=False, hatch="xx", edgecolor="#FFFFFF",
                                       lw=0, alpha=0.55))
            if not annotate:
                continue
            text = _cell_text(kind, values.to_numpy()[i, j], verdict, int(cell_n),
                              0 if step0 else int(ndiv.to_numpy()[i, j]), not same_n)
            rgba = (mcolors.to_rgba(DIVERGED_FACE) if all_diverged or kind == "verdict" and verdict == "diverged"
                    else mappable.to_rgba(grid.to_numpy()[i, j]) if np.isfinite(grid.to_numpy()[i, j]) else (1, 1, 1, 1))
            # Cell labels sit inside their cell: keeping them out of the layout engine spares it a bbox per cell.
            ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=fontsize, color=_ink(rgba), in_layout=False)
        xlabels = [_fmt(v) for v in x_values]
        ax.set_xticks(np.arange(nx) + 0.5, xlabels, rotation=90 if nx * max(map(len, xlabels)) > 60 else 0)
        ax.set_yticks(np.arange(ny) + 0.5, [_fmt(v) for v in y_values])
        ax.set_xlabel(layout.x or "")
        ax.set_ylabel(layout.y or "")
        ax.set_xlim(0, nx)
        ax.set_ylim(ny, 0)
        ax.set_title(facet, fontsize=10)
    fig.suptitle(title, fontsize=11)
    # what the report records of this figure (figures.json), for checks a script can make
    fig.gradsweep_info = {"kind": kind, "x": layout.x, "y": layout.y, "facets": list(layout.facets),
                          "colour": [float(e) for e in ratio_edges] if kind == "ratio" else
                          [float(norm.vmin), float(norm.vmax)] if kind in ("loss", "accuracy") else None}
    if kind == "verdict":
        fig.legend(handles=[Patch(color=VERDICT_COLORS[v], label=v) for v in VERDICTS], loc="outside lower center",
                   ncol=3, frameon=False, fontsize=9)
        return fig
    bar = fig.colorbar(mappable, ax=axes, shrink=0.95, pad=0.02, aspect=25,
                       extend="both" if kind == "ratio" else "neither")
    bar.set_label(label, fontsize=9)
    if kind == "loss":  # 1-2-5 ticks in plain numbers, not only the powers of ten
        from matplotlib.ticker import FuncFormatter, LogLocator

        bar.ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        bar.ax.yaxis.set_minor_locator(LogLocator(subs="auto"))
        bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        bar.ax.tick_params(labelsize=8)
    if kind == "ratio":
        ticks = [e for e in ratio_edges if e != 0]
        bar.set_ticks(ticks, labels=[_ratio_words(t, vanish, explode) for t in ticks], fontsize=8)
        for threshold in (vanish, explode):
            bar.ax.axhline(threshold, color="black", lw=1.6)
    handles = []
    if kind == "loss" and marked:
        handles.append(Patch(facecolor="#999999", hatch="xx", edgecolor="white",
                             label=f"learned nothing: {baseline_words or 'no better than the baseline'}"))
    if not step0 and (cells["n_diverged"] == cells["n"]).any():
        handles.append(Patch(facecolor=DIVERGED_FACE, hatch="//", edgecolor="#BBBBBB", label="all runs diverged"))
    if _has_empty_cell(cells, x_values, y_values):
        handles.append(Patch(facecolor=MISSING_FACE, edgecolor="#999999", label="no run"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    return fig


def _has_empty_cell(cells: pd.DataFrame, x_values: list, y_values: list) -> bool:
    per_panel = len(x_values) * len(y_values)
    return any(len(panel) < per_panel for _, panel in _panels(cells))


def smallest_text_pt(fig: plt.Figure) -> float:
    """The smallest font size (points) of any text the figure shows (call after it has been drawn)."""
    import matplotlib.text

    def shown(t: matplotlib.text.Text) -> bool:
        return bool(t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.get_visible()))

    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if shown(t)]
    return float(min(sizes)) if sizes else 0.0


def _ratio_words(t: float, vanish: float, explode: float) -> str:
    if t == 0:
        return "0  equal"
    factor = 10 ** abs(t)
    words = (f"1e{abs(t):g}x" if abs(t) > 3 else f"{factor:,.0f}x" if factor >= 10 else f"{factor:.2g}x") + \
        (" weaker" if t < 0 else " stronger")
    tag = " | vanishing below" if t == vanish else " | exploding above" if t == explode else ""
    return f"{t:+g}: {words}{tag}"


def _cell_text(kind: str, value: float, verdict: str, n: int, n_div: int, show_n: bool) -> str:
    if kind == "verdict":
        text = verdict
    elif n_div == n:
        text = "diverged"
    elif np.isneginf(value):
        text = "-inf"
    elif np.isposinf(value):
        text = "+inf"
    else:
        text = (f"{value:+.2f}" if abs(value) >= 0.005 else "0.00") if kind == "ratio" else f"{value:.3g}"
    extra = []
    if n_div and (kind == "verdict" or n_div != n):
        extra.append(f"{n_div}/{n} div")
    elif show_n:
        extra.append(f"n={n}")
    return text + ("\n" + ", ".join(extra) if extra else "")


def _ink(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def flow_maps(flow: pd.DataFrame, runs: pd.DataFrame, titles: dict[str, str]) -> plt.Figure:
    """Gradient-flow maps: for each run, layer (y) by step (x), colour log10 |dL/dh| of its Linear layers.

    A signal of exactly 0 gets its own colour by cause (gradsweep.verdicts.zero_causes): cut off, every unit below
    a layer dead (or saturated to its float bound), or a decaying signal that underflowed the run's dtype."""
    from matplotlib.ticker import MaxNLocator

    from gradsweep.verdicts import CUT, UNDERFLOW, underflow_floor, zero_causes

    ids = list(titles)
    # Two maps a row, each with its own colour range: one run whose signal falls to 1e-26 must not wash out the rest.
    ncols = min(len(ids), 2)
    nrows = math.ceil(len(ids) / ncols)
    # Each map with its step-0 profile and its colour bar as real axes, so the layout engine makes room for them.
    fig, grid_axes = plt.subplots(nrows, 3 * ncols, figsize=(MAX_WIDTH_IN / 2 * ncols, 3.6 * nrows + 0.8),
                                  squeeze=False, layout="constrained", width_ratios=[1.0, 0.26, 0.045] * ncols)
    axes = [grid_axes[i // ncols][3 * (i % ncols)] for i in range(nrows * ncols)]
    side = {id(grid_axes[i // ncols][3 * (i % ncols)]): (grid_axes[i // ncols][3 * (i % ncols) + 1],
                                                         grid_axes[i // ncols][3 * (i % ncols) + 2])
            for i in range(nrows * ncols)}
    for ax in axes[len(ids):]:
        for a in (ax, *side[id(ax)]):
            a.set_visible(False)
    h = flow["hgrad_norm"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        vals = np.log10(h)
    cmap = plt.get_cmap("magma")
    flow = flow.assign(log_h=vals)
    by_id = runs.set_index("run_id")
    seen: set[int] = set()
    for ax, run_id in zip(axes, ids):
        one = flow[flow.run_id == run_id]
        grid = one.pivot_table(index="layer", columns="step", values="log_h", aggfunc="first")
        raw = one.pivot_table(index="layer", columns="step", values="hgrad_norm", aggfunc="first").to_numpy()
        steps, layers_ = grid.columns.to_numpy(), grid.index.to_numpy()
        x_edges = np.append(steps, steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1)) - 0.5
        y_edges = np.append(layers_, layers_[-1] + 1) - 0.5
        finite = grid.to_numpy()[np.isfinite(grid.to_numpy())]
        lo, hi = (np.percentile(finite, 1), np.percentile(finite, 99)) if finite.size else (-1.0, 1.0)
        if hi - lo < 0.5:
            lo, hi = lo - 0.5, hi + 0.5
        mappable = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(grid.to_numpy()), cmap=cmap,
                                 vmin=lo, vmax=hi, shading="flat")
        row = by_id.loc[run_id]
        causes = zero_causes(raw.T, underflow_floor(str(row.get("train.dtype", "float32")))).T  # (layers, steps)
        causes = np.where(np.isnan(raw), -1, causes)
        for cause, colour in ((CUT, ZERO_SIGNAL), (UNDERFLOW, UNDERFLOW_COLOR)):
            if (causes == cause).any():
                seen.add(cause)
                ax.pcolormesh(x_edges, y_edges, np.ma.masked_where(causes != cause, np.ones_like(raw)),
                              cmap=mcolors.ListedColormap([colour]), shading="flat")
        ax.set_facecolor(MISSING_FACE)
        if pd.notna(row["diverged_step"]):
            d = int(row["diverged_step"])
            right = d > (x_edges[0] + x_edges[-1]) / 2
            ax.axvline(d, color="#00BFFF", lw=1.5, ls="--")
            ax.text(d, layers_[-1], ("diverged " if right else " diverged"), color="#0077AA", fontsize=9, va="top",
                    ha="right" if right else "left", clip_on=True)
        ax.set_title(_wrap_title(titles[run_id], 60), fontsize=9, loc="left")
        ax.set_xlabel("step", fontsize=9)
        ax.set_ylabel("Linear layer (1 = input side)", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        profile_ax, bar_ax = side[id(ax)]
        _profile_inset(ax, one, row, layers_, profile_ax)
        ax.set_yticks(layers_ if len(layers_) <= 12 else layers_[:: max(1, len(layers_) // 10)])
        bar = fig.colorbar(mappable, cax=bar_ax, extend="min")
        bar.set_label("log10 |dL/dh|", fontsize=8)
        bar.ax.tick_params(labelsize=8)
    handles = []
    if CUT in seen:
        handles.append(Patch(color=ZERO_SIGNAL, label="exactly 0: cut off above (every unit of a layer dead or saturated)"))
    if UNDERFLOW in seen:
        handles.append(Patch(color=UNDERFLOW_COLOR, label="0: underflow (the signal fell below the dtype's smallest number)"))
    if flow["hgrad_norm"].isna().any() or runs.set_index("run_id").loc[ids, "diverged_step"].notna().any():
        handles.append(Patch(facecolor=MISSING_FACE, edgecolor="#999999", label="not recorded (after divergence)"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)
    return fig


def _wrap_title(title: str, width: int) -> str:
    """A flow map's title, its key=value line broken at commas where it is wider than the map."""
    import textwrap

    head, _, rest = title.partition("\n")
    return "\n".join([*textwrap.wrap(head, width, break_long_words=False), *([rest] if rest else [])])


def _profile_inset(ax: plt.Axes, one: pd.DataFrame, row: pd.Series, layers_: np.ndarray, inset: plt.Axes) -> None:
    """Beside a flow map: the step-0 profile, log10 |dL/dh_l| / |dL/dh_readout| per layer, measured (dots) and
    as mean-field theory predicts it (line: 0.5 sum of log10 chi over the blocks above the layer)."""
    first = one[one["step"] == one["step"].min()].set_index("layer")["log_h"]
    if first.empty or first.index.max() not in first.index or not np.isfinite(first.loc[first.index.max()]):
        inset.set_visible(False)
        return
    first = first[np.isfinite(first)]  # a zero signal has no log: it is coloured in the map, not plotted here
    inset.sharey(ax)
    measured = first - first.loc[first.index.max()]
    inset.plot(measured.to_numpy(), measured.index.to_numpy(), "o", ms=3, color="#333333", label="measured")
    chi = row.get("pred_chi")
    if chi is not None and not (isinstance(chi, float) and np.isnan(chi)) and len(chi) == len(layers_) - 1:
        with np.errstate(divide="ignore"):
            above = 0.5 * np.cumsum(np.log10(np.asarray(chi, dtype=float))[::-1])[::-1]  # layer l: blocks l..depth
        inset.plot(np.append(above, 0.0), layers_, "-", color="#E69F00", lw=1.8, label="theory")
    inset.axvline(0, color="#BBBBBB", lw=0.8)
    inset.set_xlabel("log10 ratio\nat step 0", fontsize=8)
    inset.tick_params(labelsize=8, labelleft=False)
    inset.legend(fontsize=8, loc="lower left", framealpha=0.8, handlelength=1.0)


def loss_curves(curves: pd.DataFrame, ends: pd.DataFrame, layout: Layout, baseline: float | None = None) -> plt.Figure:
    """Loss against step as small multiples: rows are facet combinations, columns y values, one line per x value
    (``curves`` from report._loss_frames). Log y when the finite losses span more than two decades; diverged runs
    are marked at the top of their panel at the step their record ends, so their 1e20s do not flatten the rest."""
    rows = list(dict.fromkeys(curves.sort_values("row_rank", kind="stable")["row"]))
    cols = list(dict.fromkeys(curves.sort_values("col_rank", kind="stable")["col"]))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(min(3.9 * len(cols) + 1.2, MAX_WIDTH_IN), 2.5 * len(rows) + 1.0),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    hue_values = sorted(curves["hue"].unique(), key=lambda v: layout.rank(layout.x, v) if layout.x else 0)
    palette = dict(zip(hue_values, sns.color_palette("viridis" if len(hue_values) > 8 else "colorblind",
                                                     len(hue_values))))
    finite = curves["loss"].to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    diverged_lines = set(zip(ends["row"], ends["col"], ends["hue"]))
    # The y range from curves that did not diverge (a diverging median runs off to 1e20 and would flatten the rest).
    steady = curves[[(r, c, h) not in diverged_lines for r, c, h in zip(curves["row"], curves["col"], curves["hue"])]]
    ok = steady["loss"].to_numpy(dtype=float)
    ok = ok[np.isfinite(ok)] if np.isfinite(ok).any() else finite
    log_y = bool(ok.size) and bool((ok > 0).all()) and ok.max() / ok.min() > 100
    # Transient spikes (a run that recovers from 1e9) are clipped to the top edge rather than stretching the axis.
    lo, hi = (float(ok.min()), float(min(ok.max(), 3 * np.percentile(ok, 99)))) if ok.size else (0.0, 1.0)
    if log_y:
        lo, hi = lo / 1.5, hi * 1.5
    else:
        pad = 0.05 * (hi - lo) if hi > lo else 0.05 * abs(hi) or 1.0  # one value (a single step): a band around it
        lo, hi = lo - pad, hi + pad
    for i, row in enumerate(rows):
        for j, col in enumerate(cols):
            ax = axes[i][j]
            sub = curves[(curves["row"] == row) & (curves["col"] == col)]
            for hue in hue_values:
                line = sub[sub["hue"] == hue]
                if len(line):
                    ax.plot(line["step"], line["loss"].clip(upper=hi), color=palette[hue], lw=1.4, label=_fmt(hue))
            end = ends[(ends["row"] == row) & (ends["col"] == col)]
            if len(end):
                ax.scatter(end["step"], np.full(len(end), hi), marker="x", color="#D55E00", s=40, zorder=5,
                           clip_on=False, label="diverged (record ends)")
            if baseline is not None and lo < baseline < hi:
                ax.axhline(baseline, color="#555555", ls=":", lw=1)
            if log_y:
                ax.set_yscale("log")
            ax.set_ylim(lo, hi)
            ax.set_title(", ".join(t for t in (row, col) if t), fontsize=9)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=8)
            if i == len(rows) - 1:
                ax.set_xlabel("step", fontsize=9)
            if j == 0:
                ax.set_ylabel("loss", fontsize=9)
    handles = [plt.Line2D([], [], color=palette[h], lw=1.6, label=_fmt(h)) for h in hue_values]
    if len(ends):
        handles.append(plt.Line2D([], [], color="#D55E00", marker="x", ls="", label="diverged: its record ends here"))
    if baseline is not None:
        handles.append(plt.Line2D([], [], color="#555555", ls=":", label=f"baseline loss {baseline:.3g}"))
    fig.gradsweep_info = {"log_y": bool(log_y), "panels": len(rows) * len(cols)}
    fig.suptitle("Loss, median over seeds" + (" (log scale)" if log_y else "") +
                 (f"; one line per {layout.x}" if layout.x else ""), fontsize=11)
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 8), fontsize=9, frameon=False)
    return fig


def stability_plot(trials: pd.DataFrame, summary: dict) -> plt.Figure:
    """Loss (log) against learning rate (log) for every trial of a tune study: stable trials, unstable ones coloured
    by their verdict, diverged ones at the top; the stable band around the best trial shaded, its definition below."""
    fig, ax = plt.subplots(figsize=(8.5, 5.6))
    done = trials[trials["state"] == "COMPLETE"] if len(trials) else trials
    finite = done[np.isfinite(done["value"].astype(float))] if len(done) else done
    top = float(finite["value"].max()) * 3 if len(finite) else 1.0
    stable = finite[finite["feasible"]]
    unstable = finite[~finite["feasible"]]
    diverged = done[~np.isfinite(done["value"].astype(float))] if len(done) else done
    ax.scatter(stable["lr"], stable["value"], s=28, color=VERDICT_COLORS["healthy"], label=f"stable ({len(stable)})",
               zorder=3)
    for verdict, sub in unstable.groupby(unstable["verdict"].fillna("healthy") if len(unstable) else [], sort=False):
        why = verdict if verdict != "healthy" else "healthy, but the loss rose"
        ax.scatter(sub["lr"], sub["value"], s=36, marker="x", color=VERDICT_COLORS.get(verdict, "#D55E00"),
                   label=f"unstable: {why} ({len(sub)})", zorder=3)
    if len(diverged):
        ax.scatter(diverged["lr"], np.full(len(diverged), top), s=40, marker="^", color=DIVERGED_FACE,
                   label=f"diverged, drawn at the top ({len(diverged)})", zorder=3, clip_on=False)
    edge = summary["edge"]
    lo, hi = edge.get("smallest_stable_lr"), edge["largest_stable_lr"]
    up, down = edge["smallest_unstable_lr_above"], edge.get("largest_unstable_lr_below")
    if lo is not None and hi is not None:
        ax.axvspan(lo, hi, color=VERDICT_COLORS["healthy"], alpha=0.12, lw=0,
                   label=f"stable band: lr {lo:.3g} .. {hi:.3g}")
    if up is not None:
        ax.axvline(up, color=VERDICT_COLORS["exploding"], ls=":", lw=1.4, label=f"first unstable lr above: {up:.3g}")
    if down is not None:
        ax.axvline(down, color=VERDICT_COLORS["stalled"], ls=":", lw=1.4, label=f"first unstable lr below: {down:.3g}")
    best = summary["best"]
    if best is not None:
        ax.scatter([best["lr"]], [best["loss"]], s=180, marker="*", color="#E69F00", edgecolor="black", zorder=4,
                   label=f"best stable lr {best['lr']:.3g}")
    ax.set_xscale("log")
    if len(finite) and (finite["value"] > 0).all():
        ax.set_yscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(("final loss" if summary["objective"] == "final_loss" else "mean loss over training") + " (log scale)")
    ax.set_title(f"Learning-rate search: {summary['study_name']}\n{summary['trials']} trials, "
                 f"{summary['feasible']} stable, {summary['diverged']} diverged", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    definition = summary.get("edge_definition")
    if definition:
        fig.text(0.01, 0.01, _wrap(definition, 110), fontsize=8, color="#444444", va="bottom")
    fig.tight_layout(rect=(0, 0.08 if definition else 0, 1, 1))
    return fig


# The article's claims (../shared/ARTICLE.md), keyed by the experiment preset that reproduces each.
ARTICLE_CLAIMS = {
    "activation": "sigmoid vs ReLU (default init, lr 0.01, 500 steps). Claim: the sigmoid net's loss falls slowly, "
                  "the ReLU net's quickly.",
    "clipping": "std-10 weights, lr 0.1, 50 steps, no clipping vs clip_grad_norm_(10). Claim: without clipping the "
                "loss grows fast and is unstable; with it training is stable and the loss falls.",
    "init": "ReLU net, xavier_uniform_ vs kaiming_uniform_, lr 0.01, 500 steps. The article compares the two loss "
            "curves.",
}


def article_figure(loss: pd.DataFrame, runs: pd.DataFrame, arm: str, experiment: str) -> plt.Figure:
    """The article's figure: the loss curves of the experiment's two arms in one plot (epoch on x, loss on y),
    every seed as a thin line and the median over seeds bold; an x where a diverged run's record ends."""
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    label = runs[arm].map(lambda v: "null" if pd.isna(v) else _fmt(v))
    arms = list(dict.fromkeys(label))
    palette = dict(zip(arms, sns.color_palette("colorblind", len(arms))))
    by_run = loss.merge(runs[["run_id", "diverged_step"]].assign(arm=label), on="run_id")
    by_run = by_run[np.isfinite(by_run["loss"].astype(float))]
    pos = by_run["loss"].to_numpy(dtype=float)
    pos = pos[pos > 0]
    for value in arms:
        sub = by_run[by_run["arm"] == value]
        for _, one in sub.groupby("run_id"):
            ax.plot(one["step"], one["loss"], color=palette[value], lw=0.6, alpha=0.35, marker="." if len(one) < 3 else None)
        med = sub.groupby("step")["loss"].median()
        n = int((label == value).sum())
        ax.plot(med.index, med.values, color=palette[value], lw=2.2, marker="o" if len(med) < 3 else None,
                label=f"{arm}={value} (median of {n} seeds)")
        ends = sub[sub["diverged_step"].notna()].groupby("run_id").tail(1)
        if len(ends):
            ax.scatter(ends["step"], ends["loss"], marker="x", s=70, color=palette[value], zorder=5, linewidths=2,
                       label=f"{arm}={value}: diverged, record ends ({ends['run_id'].nunique()})")
    if pos.size and pos.max() / pos.min() > 100:
        ax.set_yscale("log")
    ax.set_xlim(-0.02 * max(float(runs["train.steps"].max()), 1), float(runs["train.steps"].max()))
    ax.set_xlabel("epoch (full-batch step)")
    ax.set_ylabel("training loss (MSE)")
    ax.set_title(f"The article's experiment: {experiment}\n" + _wrap(ARTICLE_CLAIMS.get(experiment, ""), 95), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def prediction_scatter(runs: pd.DataFrame) -> plt.Figure:
    """Measured against mean-field predicted log10 ratios at initialisation, one point per run, identity drawn:
    the backpropagated signal (left) and the weight gradients (right)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    hue = "model.activation" if runs["model.activation"].nunique() > 1 else "init"
    values = list(dict.fromkeys(runs[hue].map(_fmt)))
    palette = dict(zip(values, sns.color_palette("colorblind", len(values))))
    for ax, (pred, meas, what) in zip(axes, [("pred_grad_ratio_log10", "grad_ratio_log10", "|dL/dh|"),
                                             ("pred_wgrad_ratio_log10", "wgrad_ratio_log10", "|dL/dW|")]):
        predicted = runs[np.isfinite(runs[pred].astype(float))]
        measured = predicted[meas].astype(float)
        sub = predicted[np.isfinite(measured)]
        floor = predicted[np.isneginf(measured)]  # no signal at all reached layer 1: drawn at the bottom edge
        for value in values:
            one = sub[sub[hue].map(_fmt) == value]
            if len(one):
                ax.scatter(one[pred], one[meas], s=22, color=palette[value], label=f"{hue}={value}", alpha=0.85)
        if len(sub) or len(floor):
            both = pd.concat([sub[pred], sub[meas], floor[pred]]).astype(float)
            lo, hi = float(both.min()) - 0.3, float(both.max()) + 0.3
            ax.plot([lo, hi], [lo, hi], color="#555555", lw=1, ls="--", label="measured = predicted")
            if len(floor):
                ax.scatter(floor[pred], np.full(len(floor), lo), marker="v", s=40, color="#333333", clip_on=False,
                           zorder=4, label=f"measured -inf: no signal ({len(floor)})")
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
        ax.set_xlabel(f"predicted log10 {what} ratio, first Linear / readout")
        ax.set_ylabel("measured at step 0")
        # Points closer than a marker's width (1/60 of the axis, ~8 px here) read as one: count what a reader sees.
        cell = (hi - lo) / 60 if len(sub) or len(floor) else 1.0
        distinct = len(np.unique(np.floor(sub[[pred, meas]].to_numpy(dtype=float) / cell), axis=0))
        words = f"{what}: {len(predicted)} runs with a prediction"
        if len(floor):
            words += f", {len(floor)} measured -inf (at the bottom)"
        if distinct < len(sub):
            words += f"\n{len(sub)} finite points, {distinct} distinct at this scale (the rest overlap)"
        ax.set_title(words, fontsize=9)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Mean-field theory against measurement, at initialisation", fontsize=11)
    fig.tight_layout()
    return fig
