"""Where-it-breaks heatmaps: one cell per swept configuration, coloured by ratio, loss, accuracy or verdict."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from gradsweep.report.figures.style import (  # noqa: E402
    DIVERGED_FACE,
    MAX_ANNOTATED_CELLS,
    MISSING_FACE,
    RATIO_CMAP,
    VERDICT_COLORS,
    _fmt,
    _grid,
    _ink,
    _panels,
    _wrap,
)
from gradsweep.report.layout import Layout  # noqa: E402
from gradsweep.results.verdicts import VERDICTS  # noqa: E402


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


def cell_axes(cells: pd.DataFrame, layout: Layout) -> tuple[pd.DataFrame, list, list, list[tuple[str, pd.DataFrame]]]:
    """A heatmap's cells with null keys spelled "null", its x and y values in the command's order, its panels."""
    cells = cells.copy()
    for key in (layout.x, layout.y):
        if key is not None:
            cells[key] = cells[key].where(cells[key].notna(), "null")
    return cells, _axis_values(cells, layout.x, layout), _axis_values(cells, layout.y, layout), _panels(cells)


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
    cells, x_values, y_values, panels = cell_axes(cells, layout)
    nx, ny = len(x_values), len(y_values)
    fig, axes = _grid(len(panels), panel_w=max(3.0, 0.62 * nx + 1.3), panel_h=max(2.0, 0.5 * ny + 1.3),
                      extra_w=0.5 if kind == "verdict" else 3.0)
    same_n = cells["n"].nunique() == 1  # then the count goes in the title, not in every cell
    if same_n and int(cells["n"].iloc[0]) > 1:
        title += f" ({int(cells['n'].iloc[0])} runs per cell)"
    cmap, norm, ratio_edges = _scale(kind, cells, vanish, explode)
    style = _Style(layout, kind, x_values, y_values, cmap, norm, ratio_edges[-1] if ratio_edges else 0.0,
                   fontsize=10 if nx * ny <= 40 else 9 if nx * ny <= 150 else 8,
                   annotate=nx * ny <= MAX_ANNOTATED_CELLS, same_n=same_n, step0=step0)
    drawn = [_draw_panel(ax, facet, panel, style) for ax, (facet, panel) in zip(axes, panels)]
    mappable, marked = drawn[-1][0], any(m for _, m in drawn)
    # a narrow sweep's figure is narrower than its title: wrap it to the figure (11 pt, ~0.55 em per character)
    width = max(30, int(fig.get_figwidth() * 72 / (11 * 0.55)))
    fig.suptitle("\n".join(_wrap(line, width) for line in title.split("\n")), fontsize=11)
    # what the report records of this figure (figures.json), for checks a script can make
    fig.gradsweep_info = {"kind": kind, "x": layout.x, "y": layout.y, "facets": list(layout.facets),
                          "colour": [float(e) for e in ratio_edges] if kind == "ratio" else
                          [float(norm.vmin), float(norm.vmax)] if kind in ("loss", "accuracy") else None}
    if kind == "verdict":
        fig.legend(handles=[Patch(color=VERDICT_COLORS[v], label=v) for v in VERDICTS], loc="outside lower center",
                   ncol=3, frameon=False, fontsize=9)
        return fig
    _colorbar(fig, axes, mappable, kind, label, ratio_edges, vanish, explode)
    _legend(fig, cells, x_values, y_values, kind == "loss" and marked, baseline_words, step0)
    return fig


@dataclass
class _Style:
    """What every panel of one heatmap shares: its axes' values, colour scale and cell labels."""

    layout: Layout
    kind: str
    x_values: list
    y_values: list
    cmap: Any
    norm: Any
    span: float
    """The ratio scale's outer edge (ratio figures): -inf and +inf are drawn at twice it."""
    fontsize: int
    annotate: bool
    same_n: bool
    step0: bool


def _scale(kind: str, cells: pd.DataFrame, vanish: float, explode: float) -> tuple[Any, Any, list[float]]:
    """The colour map and norm of a heatmap kind, and the ratio scale's edges (ratio only; else empty)."""
    if kind == "ratio":
        return ratio_scale(vanish, explode)
    if kind == "accuracy":
        return plt.get_cmap("viridis"), mcolors.Normalize(vmin=0.0, vmax=1.0), []
    if kind == "loss":
        finite = cells["value"].to_numpy(dtype=float)
        pos = finite[np.isfinite(finite) & (finite > 0)]
        lo, hi = (pos.min(), pos.max()) if pos.size else (1e-3, 1.0)
        if hi <= lo * 1.0001:
            lo, hi = lo / 2, hi * 2
        return plt.get_cmap("viridis"), mcolors.LogNorm(vmin=lo, vmax=hi), []
    cmap = mcolors.ListedColormap([VERDICT_COLORS[v] for v in VERDICTS])
    return cmap, mcolors.BoundaryNorm(np.arange(-0.5, len(VERDICTS)), len(VERDICTS)), []


def _draw_panel(ax: Any, facet: str, panel: pd.DataFrame, st: _Style) -> tuple[Any, bool]:
    """One facet's cells, coloured and labelled; returns its mesh and whether a cell is marked at the baseline."""
    layout, kind, x_values, y_values = st.layout, st.kind, st.x_values, st.y_values
    values = _pivot(panel, layout, "value", x_values, y_values)
    verdicts = _pivot(panel, layout, "verdict", x_values, y_values)
    n = _pivot(panel, layout, "n", x_values, y_values).to_numpy()
    ndiv = _pivot(panel, layout, "n_diverged", x_values, y_values).to_numpy()
    at_base = (_pivot(panel, layout, "at_baseline", x_values, y_values).fillna(False).to_numpy() if kind == "loss"
               else np.zeros(n.shape, dtype=bool))
    if kind == "verdict":
        grid = verdicts.apply(lambda col: col.map({v: i for i, v in enumerate(VERDICTS)})).astype(float)
    else:
        grid = values.astype(float)
        if kind == "ratio":  # -inf (no signal at all reaches layer 1) drawn at the end of the scale, labelled
            grid = grid.clip(lower=-2 * st.span, upper=2 * st.span)
    grid = grid.to_numpy()
    ax.set_facecolor(MISSING_FACE)
    mesh = ax.pcolormesh(np.ma.masked_invalid(grid), cmap=st.cmap, norm=st.norm, edgecolors="white", linewidth=1.0)
    for (i, j), verdict in np.ndenumerate(verdicts.to_numpy()):
        if pd.isna(n[i, j]):
            if st.annotate:
                ax.text(j + 0.5, i + 0.5, "no run", ha="center", va="center", fontsize=st.fontsize, color="#777777",
                        in_layout=False)
            continue
        all_diverged = ndiv[i, j] == n[i, j] and not st.step0
        if all_diverged and kind != "verdict":
            ax.add_patch(Rectangle((j, i), 1, 1, facecolor=DIVERGED_FACE, hatch="//", edgecolor="#BBBBBB", lw=0))
        if bool(at_base[i, j]):
            ax.add_patch(Rectangle((j + 0.04, i + 0.04), 0.92, 0.92, fill=False, hatch="xx", edgecolor="#FFFFFF",
                                   lw=0, alpha=0.55))
        if not st.annotate:
            continue
        text = _cell_text(kind, values.to_numpy()[i, j], verdict, int(n[i, j]), 0 if st.step0 else int(ndiv[i, j]),
                          not st.same_n)
        rgba = (mcolors.to_rgba(DIVERGED_FACE) if all_diverged or kind == "verdict" and verdict == "diverged"
                else mesh.to_rgba(grid[i, j]) if np.isfinite(grid[i, j]) else (1, 1, 1, 1))
        # Cell labels sit inside their cell: keeping them out of the layout engine spares it a bbox per cell.
        ax.text(j + 0.5, i + 0.5, text, ha="center", va="center", fontsize=st.fontsize, color=_ink(rgba),
                in_layout=False)
    xlabels = [_fmt(v) for v in x_values]
    ax.set_xticks(np.arange(len(x_values)) + 0.5, xlabels,
                  rotation=90 if len(x_values) * max(map(len, xlabels)) > 60 else 0)
    ax.set_yticks(np.arange(len(y_values)) + 0.5, [_fmt(v) for v in y_values])
    ax.set_xlabel(layout.x or "")
    ax.set_ylabel(layout.y or "")
    ax.set_xlim(0, len(x_values))
    ax.set_ylim(len(y_values), 0)
    ax.set_title(facet, fontsize=10)
    return mesh, bool(at_base.any())


def _colorbar(fig: plt.Figure, axes: Any, mappable: Any, kind: str, label: str, ratio_edges: list[float],
              vanish: float, explode: float) -> None:
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


def _legend(fig: plt.Figure, cells: pd.DataFrame, x_values: list, y_values: list, marked: bool,
            baseline_words: str, step0: bool) -> None:
    """The hatches' and empty cells' legend, for those the figure has."""
    handles = []
    if marked:
        handles.append(Patch(facecolor="#999999", hatch="xx", edgecolor="white",
                             label=f"learned nothing: {baseline_words or 'no better than the baseline'}"))
    if not step0 and (cells["n_diverged"] == cells["n"]).any():
        handles.append(Patch(facecolor=DIVERGED_FACE, hatch="//", edgecolor="#BBBBBB", label="all runs diverged"))
    if _has_empty_cell(cells, x_values, y_values):
        handles.append(Patch(facecolor=MISSING_FACE, edgecolor="#999999", label="no run"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)


def _has_empty_cell(cells: pd.DataFrame, x_values: list, y_values: list) -> bool:
    per_panel = len(x_values) * len(y_values)
    return any(len(panel) < per_panel for _, panel in _panels(cells))


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
