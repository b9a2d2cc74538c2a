"""Gradient-flow maps: each picked run's per-layer signal over its steps, and its step-0 profile."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.colors as mcolors  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from gradsweep.report.figures.style import (  # noqa: E402
    MAX_WIDTH_IN,
    MISSING_FACE,
    UNDERFLOW_COLOR,
    ZERO_SIGNAL,
    _wrap_title,
)


def flow_maps(flow: pd.DataFrame, runs: pd.DataFrame, titles: dict[str, str]) -> plt.Figure:
    """Gradient-flow maps: for each run, layer (y) by step (x), colour log10 |dL/dh| of its Linear, Conv and norm
    layers.

    A signal of exactly 0 gets its own colour by cause (gradsweep.results.verdicts.zero_causes): cut off, every unit below
    a layer dead (or saturated to its float bound), or a decaying signal that underflowed the run's dtype."""
    ids = list(titles)
    fig, panels = _flow_grid(len(ids))
    with np.errstate(divide="ignore", invalid="ignore"):
        flow = flow.assign(log_h=np.log10(flow["hgrad_norm"].to_numpy(dtype=float)))
    by_id = runs.set_index("run_id")
    seen: set[int] = set()  # the zero causes coloured in any map, for the legend
    drawn: dict[str, list[str]] = {}  # per map, its rows' layer names from the input side (figures.json)
    for panel, run_id in zip(panels, ids):
        one, names = _ordered_layers(flow[flow.run_id == run_id])
        drawn[run_id] = [names.get(k, f"linear{k}") for k in sorted(set(one["layer"]))]
        seen |= _draw_map(fig, panel, one, names, by_id.loc[run_id], titles[run_id])
    missing = flow["hgrad_norm"].isna().any() or by_id.loc[ids, "diverged_step"].notna().any()
    _flow_legend(fig, seen, missing)
    fig.gradsweep_info = {"layers": drawn}
    return fig


def _flow_grid(n: int) -> tuple[plt.Figure, list[tuple[plt.Axes, plt.Axes, plt.Axes]]]:
    """The figure and, per map, its (map, step-0 profile, colour bar) axes; the grid's spare slots are hidden."""
    # Two maps a row, each with its own colour range: one run whose signal falls to 1e-26 must not wash out the rest.
    ncols = min(n, 2)
    nrows = math.ceil(n / ncols)
    # Each map with its step-0 profile and its colour bar as real axes, so the layout engine makes room for them.
    fig, grid_axes = plt.subplots(nrows, 3 * ncols, figsize=(MAX_WIDTH_IN / 2 * ncols, 3.6 * nrows + 0.8),
                                  squeeze=False, layout="constrained", width_ratios=[1.0, 0.26, 0.045] * ncols)
    panels = [tuple(grid_axes[i // ncols][3 * (i % ncols):3 * (i % ncols) + 3]) for i in range(nrows * ncols)]
    for panel in panels[n:]:
        for a in panel:
            a.set_visible(False)
    return fig, panels[:n]


def _draw_map(fig: plt.Figure, panel: tuple[plt.Axes, plt.Axes, plt.Axes], one: pd.DataFrame, names: dict[int, str],
              row: pd.Series, title: str) -> set[int]:
    """One run's map, step-0 profile and colour bar (``one``: its rows from _ordered_layers); returns its zero causes."""
    ax, profile_ax, bar_ax = panel
    grid = one.pivot_table(index="layer", columns="step", values="log_h", aggfunc="first")
    raw = one.pivot_table(index="layer", columns="step", values="hgrad_norm", aggfunc="first").to_numpy()
    layers_ = grid.index.to_numpy()
    x_edges, y_edges = _cell_edges(grid.columns.to_numpy(), layers_)
    lo, hi = _colour_range(grid.to_numpy())
    mappable = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(grid.to_numpy()), cmap=plt.get_cmap("magma"),
                             vmin=lo, vmax=hi, shading="flat")
    seen = _mark_zeros(ax, raw, x_edges, y_edges, str(row.get("train.dtype", "float32")))
    ax.set_facecolor(MISSING_FACE)
    if pd.notna(row["diverged_step"]):
        _mark_divergence(ax, int(row["diverged_step"]), x_edges, layers_[-1])
    _profile_inset(ax, one, row, layers_, profile_ax)
    _label_map(ax, title, layers_, names)
    _colour_bar(fig, mappable, bar_ax)
    return seen


def _cell_edges(steps: np.ndarray, layers_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A map's cell edges, each cell centred on its step (x) and layer (y); a lone step gets width 1."""
    x_edges = np.append(steps, steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1 else 1)) - 0.5
    y_edges = np.append(layers_, layers_[-1] + 1) - 0.5
    return x_edges, y_edges


def _colour_range(log_h: np.ndarray) -> tuple[float, float]:
    """A map's colour limits: the 1st and 99th percentiles of its finite log10 signal, widened if under half a decade."""
    finite = log_h[np.isfinite(log_h)]
    lo, hi = (np.percentile(finite, 1), np.percentile(finite, 99)) if finite.size else (-1.0, 1.0)
    if hi - lo < 0.5:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _mark_zeros(ax: plt.Axes, raw: np.ndarray, x_edges: np.ndarray, y_edges: np.ndarray, dtype: str) -> set[int]:
    """Over a map, its cells of exactly 0 in their cause's colour (``raw``: layers by steps); returns the causes."""
    from gradsweep.results.verdicts import CUT, UNDERFLOW, underflow_floor, zero_causes

    causes = zero_causes(raw.T, underflow_floor(dtype)).T  # (layers, steps)
    causes = np.where(np.isnan(raw), -1, causes)
    seen: set[int] = set()
    for cause, colour in ((CUT, ZERO_SIGNAL), (UNDERFLOW, UNDERFLOW_COLOR)):
        if (causes == cause).any():
            seen.add(cause)
            ax.pcolormesh(x_edges, y_edges, np.ma.masked_where(causes != cause, np.ones_like(raw)),
                          cmap=mcolors.ListedColormap([colour]), shading="flat")
    return seen


def _mark_divergence(ax: plt.Axes, step: int, x_edges: np.ndarray, top: float) -> None:
    """A dashed line at the step a run diverged, labelled at the ``top`` layer on the side with more room."""
    right = step > (x_edges[0] + x_edges[-1]) / 2
    ax.axvline(step, color="#00BFFF", lw=1.5, ls="--")
    ax.text(step, top, ("diverged " if right else " diverged"), color="#0077AA", fontsize=9, va="top",
            ha="right" if right else "left", clip_on=True)


def _label_map(ax: plt.Axes, title: str, layers_: np.ndarray, names: dict[int, str]) -> None:
    """A map's title, axis labels and ticks: its rows by layer name where the run's module names them."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(_wrap_title(title, 60), fontsize=9, loc="left")
    ax.set_xlabel("step", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.tick_params(labelsize=8)
    ticks = layers_ if len(layers_) <= 12 else layers_[:: max(1, len(layers_) // 10)]
    ax.set_yticks(ticks)
    if names:  # a module's layers: by their dotted names, input side at the bottom
        ax.set_yticklabels([names.get(t, str(t)) for t in ticks], fontsize=7 if len(ticks) > 8 else 8)
        ax.set_ylabel("layer (input side at the bottom)", fontsize=9)
    else:
        ax.set_ylabel("Linear layer (1 = input side)", fontsize=9)


def _colour_bar(fig: plt.Figure, mappable: matplotlib.cm.ScalarMappable, bar_ax: plt.Axes) -> None:
    """A map's colour bar in its own axes, extended below for signals under the colour range."""
    bar = fig.colorbar(mappable, cax=bar_ax, extend="min")
    bar.set_label("log10 |dL/dh|", fontsize=8)
    bar.ax.tick_params(labelsize=8)


def _flow_legend(fig: plt.Figure, seen: set[int], missing: bool) -> None:
    """Below the maps, a key to the zero causes coloured (``seen``) and, if any, the cells not recorded."""
    from gradsweep.results.verdicts import CUT, UNDERFLOW

    handles = []
    if CUT in seen:
        handles.append(Patch(color=ZERO_SIGNAL, label="exactly 0: cut off above (every unit of a layer dead or saturated)"))
    if UNDERFLOW in seen:
        handles.append(Patch(color=UNDERFLOW_COLOR, label="0: underflow (the signal fell below the dtype's smallest number)"))
    if missing:
        handles.append(Patch(facecolor=MISSING_FACE, edgecolor="#999999", label="not recorded (after divergence)"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize=8, frameon=False)


def _ordered_layers(one: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, str]]:
    """One run's rows with ``layer`` renumbered 1, 2, ... from the input side over every recorded layer (Linear,
    Conv and norm: the built-in MLP numbers its norm<k> with its linear<k>, which it follows), and row number ->
    layer name; {} for a plain MLP's rows, which are all linear<k> (numbered as they are)."""
    kind = one["kind"] if "kind" in one else pd.Series("linear", index=one.index)
    key = list(zip(one["layer"].astype(int), (kind == "norm").astype(int)))
    rank = {k: i + 1 for i, k in enumerate(sorted(set(key)))}
    one = one.assign(layer=[rank[k] for k in key])
    if "layer_name" not in one or one["layer_name"].isna().all():
        return one, {}
    names = one.drop_duplicates("layer").set_index("layer")["layer_name"]
    if all(name == f"linear{k}" for k, name in names.items()):
        return one, {}
    return one, {int(k): str(v) for k, v in names.items()}


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
