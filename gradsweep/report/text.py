"""The report's words: why a run got its verdict, the captions, and the text summary a sweep's report prints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from gradsweep.report.layout import Layout, value_text
from gradsweep.results.verdicts import SEVERITY, counts_text, edge_words, verdict_counts


def verdict_reason(row: pd.Series) -> str:
    """What made a run's verdict, in a few words."""
    if row["verdict"] == "dead":
        return f"no signal below layer {int(row['dead_layer'])} from step {int(row['dead_step'])}"
    if row["verdict"] == "stalled":
        return f"final loss {row['final_loss']:.3g} = {row['final_loss'] / row['baseline_loss']:.0%} of the baseline"
    if row["verdict"] == "diverged":
        return f"diverged at step {int(row['diverged_step'])} ({row['diverged_reason']})"
    text = f"ratio {row['grad_ratio_log10']:+.2f} at step 0"
    if row["verdict"] in ("vanishing", "exploding") and row.get("init_verdict") == "healthy":
        text += f", median {row['grad_ratio_log10_median']:+.2f} through training"
    return text


ARTICLE_KEY = "article"  # the column the experiment presets (gradsweep/conf/experiment/) record


def baseline_line(runs: pd.DataFrame) -> float | None:
    """The data's baseline loss, where the sweep has one (the same for every run)."""
    base = runs["baseline_loss"].astype(float).dropna().unique() if "baseline_loss" in runs else []
    return float(base[0]) if len(base) == 1 else None


def baseline_words(runs: pd.DataFrame) -> str:
    """What the baseline loss is for this sweep's loss: predicting the mean, or the class prior."""
    losses = set(runs["loss"].dropna()) if "loss" in runs else set()
    if losses == {"cross_entropy"}:
        return "predicts the class prior"
    if losses == {"mse"}:
        return "predicts the mean"
    return "the trivial predictor's loss"


def article_experiment(runs: pd.DataFrame) -> str | None:
    """The article experiment this sweep reproduces (``+experiment=...``), if it is one and only one."""
    if ARTICLE_KEY not in runs.columns:
        return None
    values = runs[ARTICLE_KEY].dropna().unique()
    return str(values[0]) if len(values) == 1 else None


def article_caption(runs: pd.DataFrame, arm: str) -> str:
    """What the runs show, per arm: final loss (median over seeds) against the initial, and divergence."""
    parts = []
    for value, sub in runs.groupby(arm, dropna=False, sort=False):
        value = "null" if pd.isna(value) else value
        diverged = int(sub["diverged_step"].notna().sum())
        final = sub["final_loss"].astype(float)
        ok = final[np.isfinite(final)]
        text = (f"{arm}={value}: {len(sub)} seeds, median final loss {ok.median():.3g} from {sub['initial_loss'].median():.3g}"
                if len(ok) else f"{arm}={value}: {len(sub)} seeds, no finite final loss")
        parts.append(text + (f", {diverged} diverged" if diverged else ""))
    return "Measured: " + "; ".join(parts) + ". Thin lines: each seed; bold: the median over seeds."


def tune_caption(best_json: Path) -> str:
    try:
        summary = json.loads(best_json.read_text())
    except (OSError, ValueError):
        return "Loss against learning rate for every trial of the search stored in this directory."
    best, edge = summary.get("best"), summary.get("edge", {})
    parts = [f"Study {summary.get('study_name')}: {summary.get('trials')} trials, {summary.get('feasible')} stable."]
    if best:
        parts.append(f"Best stable lr {best['lr']:.4g} ({summary.get('objective')} {best['loss']:.4g}).")
    if edge.get("smallest_stable_lr") is not None:
        words = edge_words(edge)
        parts.append(words[0].upper() + words[1:] + ".")
    return " ".join(parts)


def console_lines(runs: pd.DataFrame, layout: Layout, index: Path) -> str:
    lines = [f"{len(runs)} runs: " + counts_text(verdict_counts(runs)),
             f"layout: x={layout.x}, y={layout.y}" + (f", facets={', '.join(layout.facets)}" if layout.facets else "")]
    bad = runs[runs.verdict != "healthy"].assign(_sev=lambda d: d["verdict"].map(SEVERITY),
                                                 _ext=lambda d: d["grad_ratio_log10"].abs().fillna(np.inf))
    bad = bad.sort_values(["_sev", "_ext"], ascending=False, kind="stable")
    for verdict, keys, varied, values, worst, n in worst_groups(bad, [k for k in layout.keys if k in runs], layout)[:5]:
        where = ", ".join(f"{k}={v}" for k, v in keys.items())
        more = (f"; {varied}={','.join(values)}" if where else f"{varied}={','.join(values)}") if varied else ""
        where = where or ("" if varied else worst["run_id"])
        why = verdict_reason(worst) if not varied else f"worst at {varied}={value_text(worst[varied])}: {verdict_reason(worst)}"
        lines.append(f"  {verdict:9s} {where}{more}{f' ({n} runs)' if n > 1 else ''}: {why}")
    lines.append(f"report: {index}")
    return "\n".join(lines)


def worst_groups(bad: pd.DataFrame, keys: list[str],
                 layout: Layout) -> list[tuple[str, dict, str | None, list[str], pd.Series, int]]:
    """The runs of ``bad`` (worst first) gathered where they share their verdict and all swept keys but one: the
    same configuration at three learning rates is one line, not three. Each: (verdict, shared keys, the varying
    key, its values in the layout's order, the worst run, how many runs)."""
    text = value_text
    best: list = [(r["verdict"], {k: text(r[k]) for k in keys}, None, [], r, 1) for _, r in bad.iterrows()]
    for varied in keys:
        rest = [k for k in keys if k != varied]
        groups: dict[tuple, list] = {}
        for _, r in bad.iterrows():
            groups.setdefault((r["verdict"], *(text(r[k]) for k in rest)), []).append(r)
        if len(groups) < len(best):
            best = []
            for g in groups.values():
                raw = sorted({text(r[varied]): r[varied] for r in g}.values(), key=lambda v: layout.rank(varied, v))
                values = [text(v) for v in raw]
                shared = {k: text(g[0][k]) for k in rest}
                if len(values) == 1:  # only seeds differ: the value is shared too
                    best.append((g[0]["verdict"], {**shared, varied: values[0]}, None, [], g[0], len(g)))
                else:
                    best.append((g[0]["verdict"], shared, varied, values, g[0], len(g)))
    return best
