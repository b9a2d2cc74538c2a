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

from gradsweep.figures.style import (  # noqa: E402
    MAX_WIDTH_IN,
    MISSING_FACE,
    UNDERFLOW_COLOR,
    ZERO_SIGNAL,
    _wrap_title,
)


def flow_maps(flow: pd.DataFrame, runs: pd.DataFrame, titles: dict[str, str]) -> plt.Figure:
    """Gradient-flow maps: for each run, layer (y) by step (x), colour log10 |dL/dh| of its Linear, Conv and norm
    layers.

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
    drawn: dict[str, list[str]] = {}  # per map, its rows' layer names from the input side (figures.json)
    for ax, run_id in zip(axes, ids):
        one, names = _ordered_layers(flow[flow.run_id == run_id])
        drawn[run_id] = [names.get(k, f"linear{k}") for k in sorted(set(one["layer"]))]
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
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        profile_ax, bar_ax = side[id(ax)]
        _profile_inset(ax, one, row, layers_, profile_ax)
        ticks = layers_ if len(layers_) <= 12 else layers_[:: max(1, len(layers_) // 10)]
        ax.set_yticks(ticks)
        if names:  # a module's layers: by their dotted names, input side at the bottom
            ax.set_yticklabels([names.get(t, str(t)) for t in ticks], fontsize=7 if len(ticks) > 8 else 8)
            ax.set_ylabel("layer (input side at the bottom)", fontsize=9)
        else:
            ax.set_ylabel("Linear layer (1 = input side)", fontsize=9)
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
    fig.gradsweep_info = {"layers": drawn}
    return fig


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
