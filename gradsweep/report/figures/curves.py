"""Curves and scatters: loss curves by cell, the tuner's stability plot, the article's figures, theory against
measurement."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from gradsweep.report.figures.style import (  # noqa: E402
    DIVERGED_FACE,
    MAX_WIDTH_IN,
    VERDICT_COLORS,
    _fmt,
    _wrap,
    _wrap_title,
)
from gradsweep.report.layout import Layout  # noqa: E402
from gradsweep.results.verdicts import counts_text  # noqa: E402


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
    fig, (ax, rug) = plt.subplots(2, 1, figsize=(8.5, 6.2), sharex=True, height_ratios=(12, 1))
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
    _edge_lines(ax, rug, done, summary.get("curvature") or {})
    best = summary["best"]
    if best is not None:
        ax.scatter([best["lr"]], [best["loss"]], s=180, marker="*", color="#E69F00", edgecolor="black", zorder=4,
                   label=f"best stable lr {best['lr']:.3g}")
    ax.set_xscale("log")
    if len(finite) and (finite["value"] > 0).all():
        ax.set_yscale("log")
    rug.set_xlabel("learning rate (log scale)")
    ax.set_ylabel(("final loss" if summary["objective"] == "final_loss" else "mean loss over training") + " (log scale)")
    ax.set_title(_wrap_title(f"Learning-rate search: {summary['study_name']}\n{summary['trials']} trials, "
                             + counts_text(summary["counts"]), 95), fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    definition = summary.get("edge_definition")
    if definition and "phase" in done and done["phase"].notna().any():
        definition += (" Phases (the strip below): monotone - the loss never rose above its initial value; catapult - "
                       "it rose more than 1% above it, then ended below it; diverged. Dashed: the edges the sharpness "
                       "at init predicts, 2 / lambda_0 (the quadratic's, where the catapult phase begins) and "
                       "4 / lambda_0 (about where it ends, Lewkowycz et al. 2020).")
    footnote = _wrap(definition, 120) if definition else ""
    if footnote:
        fig.text(0.01, 0.01, footnote, fontsize=8, color="#444444", va="bottom")
    # the axes, x label included, sit above the footnote: its lines at 8 pt with 1.2 spacing, and a 6 pt gap
    fig.tight_layout(rect=(0, (footnote.count("\n") + 1) * 8 * 1.2 / 72 / fig.get_figheight() + 0.03 if footnote
                           else 0, 1, 1))
    return fig


PHASE_COLORS = {"monotone": VERDICT_COLORS["healthy"], "catapult": "#E69F00", "diverged": DIVERGED_FACE,
                "not_full_batch": "#BBBBBB"}


def _edge_lines(ax: plt.Axes, rug: plt.Axes, done: pd.DataFrame, prior: dict) -> None:
    """The predicted edges 2 / lambda_0 and 4 / lambda_0 on the search's plot, and each trial's phase as a strip."""
    edge = prior.get("lr_edge_pred")
    if edge:
        ax.axvline(edge, color="#0072B2", ls="--", lw=1.3, label=f"predicted edge 2 / lambda_0: {edge:.3g}")
        ax.axvline(2 * edge, color="#56B4E9", ls="--", lw=1.3, label=f"4 / lambda_0 (catapult ends): {2 * edge:.3g}")
        rug.axvline(edge, color="#0072B2", ls="--", lw=1.3)
        rug.axvline(2 * edge, color="#56B4E9", ls="--", lw=1.3)
    rug.set_yticks([])
    rug.set_ylabel("phase", fontsize=8, rotation=0, ha="right", va="center")
    phase = done["phase"] if "phase" in done else pd.Series([], dtype=object)
    for name, colour in PHASE_COLORS.items():
        lrs = done.loc[phase == name, "lr"] if len(done) else []
        if len(lrs):
            rug.vlines(lrs, 0, 1, color=colour, lw=2, label=f"{name} ({len(lrs)})")
    rug.set_ylim(0, 1)
    if phase.notna().any():
        rug.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -1.4), ncol=4, frameon=False)


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
