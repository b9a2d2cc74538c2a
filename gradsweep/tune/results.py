"""What a study found: its trials as a table, the widest stable band of learning rates and its edges, the best
stable learning rate, and the files that say so (``best.json``, ``trials.csv``, ``stability.png``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from gradsweep.results.schema import TUNE_BEST_FILE, TUNE_DIR, TUNE_FIGURE_FILE, TUNE_TRIALS_FILE
from gradsweep.tune.config import TuneCfg

CURVATURE_ATTRS = ("sharpness_init", "lr_edge_pred", "lr_over_edge", "phase")
"""The runs-table columns of a trial's curvature kept with it and in trials.csv (null where not measured)."""


def trial_frame(study: Any) -> Any:
    """One row per finished trial: number, lr, extra params, value, feasible, diverged, state."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        if "lr" not in t.params:
            continue
        rows.append({"number": t.number, "state": t.state.name, **t.params,
                     "value": t.value if t.value is not None else math.nan,
                     "feasible": bool(t.user_attrs.get("feasible", False)),
                     "diverged": bool(t.user_attrs.get("diverged", False)),
                     "final_loss": t.user_attrs.get("final_loss"), "initial_loss": t.user_attrs.get("initial_loss"),
                     "grad_ratio_log10": t.user_attrs.get("grad_ratio_log10"), "verdict": t.user_attrs.get("verdict"),
                     "baseline_loss": t.user_attrs.get("baseline_loss"), "run_id": t.user_attrs.get("run_id"),
                     **{k: t.user_attrs.get(k) for k in CURVATURE_ATTRS}})
    return pd.DataFrame(rows)


EDGE_DEFINITION = ("stable = the run's whole-run verdict is healthy and its loss fell. A stable band is a range of "
                   "learning rates, sorted, with no unstable trial inside it; the band reported is the widest one (in "
                   "decades of lr), its edges the nearest unstable trials above and below it. The best stable lr is "
                   "the lowest-loss trial of the band at least tune.safety times below the first unstable lr above "
                   "it (near the edge, whether a deep net dies is a matter of chance). A stable trial alone between "
                   "unstable neighbours is not recommended.")


def stable_band(frame: Any) -> tuple[Any, dict[str, Any]]:
    """The complete trials of the widest stable band (``EDGE_DEFINITION``) and its edges.

    Edges: ``smallest_stable_lr`` .. ``largest_stable_lr`` (no unstable trial between), ``smallest_unstable_lr_above``
    and ``largest_unstable_lr_below`` (None where no trial is unstable on that side), ``band_trials``.
    """
    edge: dict[str, Any] = {"smallest_stable_lr": None, "largest_stable_lr": None, "smallest_unstable_lr_above": None,
                            "largest_unstable_lr_below": None, "band_trials": 0}
    done = frame[frame["state"] == "COMPLETE"] if len(frame) else frame
    if not len(done):
        return done, edge
    # Sorted by lr; at an equal lr an unstable trial ends the band (so no unstable trial is ever inside one).
    done = done.assign(_unstable=~done["feasible"].astype(bool)).sort_values(["lr", "_unstable"], kind="stable")
    band_id = done["_unstable"].cumsum()  # each unstable trial starts a new id: stable runs share one
    stable = done[~done["_unstable"]]
    if not len(stable):
        edge["smallest_unstable_lr_above"] = float(done["lr"].min())
        return stable, edge

    def width(ids: Any) -> tuple[float, int, float]:
        lrs = stable.loc[ids, "lr"].astype(float)
        return (math.log10(lrs.max() / lrs.min()), len(lrs), -float(stable.loc[ids, "value"].min()))

    groups = stable.groupby(band_id[~done["_unstable"]]).groups
    chosen = stable.loc[max(groups.values(), key=width)]
    lo, hi = float(chosen["lr"].min()), float(chosen["lr"].max())
    unstable = done[done["_unstable"]]["lr"].astype(float)
    above, below = unstable[unstable > hi], unstable[unstable < lo]
    edge.update(smallest_stable_lr=lo, largest_stable_lr=hi, band_trials=int(len(chosen)),
                smallest_unstable_lr_above=float(above.min()) if len(above) else None,
                largest_unstable_lr_below=float(below.max()) if len(below) else None)
    return chosen.drop(columns="_unstable"), edge


def _float_or_none(v: Any) -> float | None:
    return None if v is None or pd.isna(v) else float(v)


def best_of_study(study: Any, tune: TuneCfg, where: str, out_dir: Path) -> dict[str, Any]:
    frame = trial_frame(study)
    done = frame[frame["state"] == "COMPLETE"] if len(frame) else frame
    feasible = done[done["feasible"]] if len(done) else done
    band, edge = stable_band(frame)
    best = isolated = None
    if len(band):
        up = edge["smallest_unstable_lr_above"]
        safe = band[band["lr"] <= up / tune.safety] if up is not None else band
        safe = safe if len(safe) else band.nsmallest(1, "lr")  # the whole band is near the edge: its lowest lr
        b = safe.loc[safe["value"].idxmin()]
        overall = feasible.loc[feasible["value"].idxmin()]
        if overall["number"] != b["number"] and overall["number"] not in set(band["number"]):
            isolated = {"trial": int(overall["number"]), "lr": float(overall["lr"]), "loss": float(overall["value"])}
        best = {"trial": int(b["number"]), "lr": float(b["lr"]), "loss": float(b["value"]), "run_id": b["run_id"],
                "final_loss": _float_or_none(b["final_loss"]), "baseline_loss": _float_or_none(b["baseline_loss"]),
                "params": {k: float(b[k]) for k in ["lr", *[d.key for d in tune.search]] if k in b}}
    return {
        "study_name": study.study_name, "storage": where, "out_dir": str(out_dir),
        "objective": tune.objective,
        "constraints": {"diverged": "no NaN/Inf in the loss or the gradient norm",
                        "dead": "some signal reaches the first Linear layer at the end of training",
                        "vanishing": "grad_ratio_log10 >= verdict.vanish_below at step 0 and as its median over training",
                        "exploding": "grad_ratio_log10 <= verdict.explode_above at step 0 and as its median over training",
                        "stalled": "final_loss < (1 - verdict.stall_margin) * baseline_loss",
                        "loss_increased": "final_loss <= initial_loss"},
        "edge_definition": EDGE_DEFINITION.replace("tune.safety", f"tune.safety ({tune.safety:g})"),
        "trials": int(len(frame)), "complete": int(len(done)), "feasible": int(len(feasible)),
        "diverged": int(done["diverged"].sum()) if len(done) else 0,
        "counts": trial_counts(frame),
        "best": best, "edge": edge,
        # a lower loss than the best's, but outside the band: unstable trials at nearby learning rates on both sides
        "isolated_better_trial": isolated,
    }


def write_outputs(study: Any, summary: dict[str, Any], tdir: Path) -> None:
    """best.json, trials.csv and stability.png, each appearing atomically."""
    from gradsweep.report.figures import plt, stability_plot
    from gradsweep.results.store import atomic, write_text_atomic

    frame = trial_frame(study)
    write_text_atomic(tdir / TUNE_BEST_FILE, json.dumps(summary, indent=2, default=_json_default) + "\n")
    write_text_atomic(tdir / TUNE_TRIALS_FILE, frame.to_csv(index=False))
    fig = stability_plot(frame, summary)
    with atomic(tdir / TUNE_FIGURE_FILE) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def _json_default(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def trial_counts(frame: Any) -> dict[str, int]:
    """Every trial of ``frame`` counted once, in words that add up to the number of trials: stable, else the
    verdict that made a complete trial unstable (a healthy one whose loss rose: ``loss rose``), else its state
    (failed, running, ...)."""
    from gradsweep.results.verdicts import VERDICTS

    if not len(frame):
        return {}
    complete = frame["state"] == "COMPLETE"
    feasible = frame["feasible"].astype(bool)
    verdict = frame["verdict"].fillna("")
    label = verdict.where(verdict != "healthy", "loss rose").where(complete, frame["state"].str.lower())
    label = label.where(~(complete & feasible), "stable")
    order = ["stable", *(v for v in VERDICTS if v != "healthy"), "loss rose"]
    counts = label.value_counts()
    return {k: int(counts[k]) for k in [*order, *sorted(set(counts.index) - set(order))] if k in counts}


def describe(summary: dict[str, Any]) -> str:
    best, edge = summary["best"], summary["edge"]
    from gradsweep.results.verdicts import counts_text, edge_words

    lines = [f"study {summary['study_name']} ({summary['storage']}): {summary['trials']} trials, "
             + counts_text(summary["counts"])]
    if best:
        lines.append(f"best stable lr = {best['lr']:.4g} (trial {best['trial']}, {summary['objective']} "
                     f"{best['loss']:.4g}; the lowest loss in the stable band, at least tune.safety below its edge)")
    else:
        lines.append("no stable learning rate found in [tune.lr_min, tune.lr_max]")
    lines.append("stability edge: " + edge_words(edge))
    prior = summary.get("curvature") or {}
    if prior.get("lr_edge_pred"):
        pred, up = prior["lr_edge_pred"], edge.get("smallest_unstable_lr_above")
        measured = f"; measured: the first unstable lr above the band is {up:.4g} = {up / pred:.2f}x it" if up else ""
        lines.append(f"predicted edge 2 / lambda_0 = {pred:.4g} (sharpness at init {prior['sharpness_init']:.4g}; "
                     f"the catapult phase to about 4 / lambda_0 = {2 * pred:.4g}){measured}")
    elif prior.get("why") and prior.get("prior") == "none" and prior["why"] != "tune.prior=none":
        lines.append(f"no curvature prior: {prior['why']}")
    iso = summary.get("isolated_better_trial")
    if iso:
        lines.append(f"not recommended: trial {iso['trial']} (lr {iso['lr']:.4g}, {summary['objective']} {iso['loss']:.4g}) "
                     "trained, but it lies outside the stable band, between unstable trials")
    lines.append(f"wrote {Path(summary['out_dir']) / TUNE_DIR}/{TUNE_BEST_FILE}, {TUNE_FIGURE_FILE}, {TUNE_TRIALS_FILE}")
    return "\n".join(lines)
