"""``python -m gradsweep.report [sweep_dir]``: a sweep's parquet turned into what a person looks at.

Writes ``<sweep_dir>/report/``: where-it-breaks heatmaps (gradient ratio, final loss, verdict),
gradient-flow maps, loss curves, ``summary.csv`` and a self-contained ``index.html``; prints a
short text summary. Without ``sweep_dir`` it reports the newest sweep under ``./outputs/multirun``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from gradsweep.errors import GradsweepError, first_line
from gradsweep.layout import AT, STATISTICS, Layout, aggregate, facet_labels, infer_layout, swept_keys, verdict_counts
from gradsweep.progress import bar as progress_bar
from gradsweep.report_text import (
    ARTICLE_KEY,
    article_caption,
    article_experiment,
    baseline_line,
    baseline_words,
    text_summary,
    tune_caption,
    verdict_reason,
)
from gradsweep.schema import SCHEMA_VERSION, TUNE_BEST_FILE, TUNE_DIR, TUNE_FIGURE_FILE
from gradsweep.store import load_runs, load_steps
from gradsweep.verdicts import SEVERITY

# What the report reads from every runs table; a sweep written before one of them existed cannot be reported.
REQUIRED_COLUMNS = ("run_id", "verdict", "init_verdict", "grad_ratio_log10", "grad_ratio_log10_median", "final_loss",
                    "initial_loss", "baseline_loss", "diverged_step", "dead_step", "dead_layer",
                    "verdict.vanish_below", "verdict.explode_above", "verdict.stall_margin")
DPI = 110  # figures are drawn at this resolution; fonts >= 8 pt then read >= 12 px (CSS 9 pt) unscaled
# Within a verdict, the run a flow map shows: the most telling one (column, ascending).
FLOW_PICK = {"diverged": ("diverged_step", True), "dead": ("dead_step", True), "stalled": ("_stall", False)}


class ReportError(GradsweepError):
    """A report that cannot be made: one line for the user."""


def latest_sweep(root: Path = Path("outputs/multirun")) -> Path:
    """The newest sweep directory under ``root`` (outputs/multirun/<date>/<time>)."""
    sweeps = [p for p in root.glob("*/*") if p.is_dir()]
    if not sweeps:
        raise ReportError(f"no sweep found under {root}; give the sweep directory: python -m gradsweep.report <sweep_dir>")
    return max(sweeps, key=lambda p: p.stat().st_mtime)


def sweep_command(sweep_dir: Path) -> str:
    """The command that made the sweep, from Hydra's own record of it."""
    from omegaconf import OmegaConf

    for path, multirun in ((sweep_dir / "multirun.yaml", True), (sweep_dir / ".hydra" / "overrides.yaml", False)):
        if path.exists():
            node = OmegaConf.load(path)
            task = list(node.hydra.overrides.task) if multirun else list(node)
            return "python -m gradsweep " + ("-m " if multirun else "") + " ".join(task)
    return ""


def command_order(sweep_dir: Path) -> dict[str, list[str]]:
    """Each swept key's values in the order the command gave them (``key=a,b,c``), from Hydra's record."""
    from omegaconf import OmegaConf

    path = sweep_dir / "multirun.yaml"
    if not path.exists():
        return {}
    order: dict[str, list[str]] = {}
    for item in OmegaConf.load(path).hydra.overrides.task:
        key, _, values = str(item).partition("=")
        if "," in values and "(" not in values and "[" not in values:  # a plain list, not range()/choice()/[...]
            order[key.lstrip("+~")] = [v.strip() for v in values.split(",")]
    return order


def pick_flow_runs(runs: pd.DataFrame, n: int | None = None) -> list[str]:
    """One run per verdict present, worst verdict first; within a verdict the earliest divergence or death, the
    stalled run furthest above its baseline, else the most extreme ratio; with ``n``, then the next most extreme
    runs up to ``n`` maps in all."""
    chosen: list[str] = []
    with np.errstate(divide="ignore", invalid="ignore"):
        stall = runs["final_loss"].astype(float) / runs["baseline_loss"].astype(float)
    ranked = runs.assign(_sev=runs["verdict"].map(SEVERITY).fillna(-1),
                         _ext=runs["grad_ratio_log10"].abs().fillna(np.inf), _stall=stall)
    for verdict, sub in sorted(ranked.groupby("verdict"), key=lambda kv: -SEVERITY.get(kv[0], -1)):
        key, ascending = FLOW_PICK.get(verdict, ("_ext", False))
        best = sub.sort_values(key, ascending=ascending, kind="stable").iloc[0]
        chosen.append(best["run_id"])
    if n is None:
        return chosen
    rest = ranked[~ranked.run_id.isin(chosen)].sort_values(["_sev", "_ext"], ascending=False)
    chosen += rest.run_id.head(max(0, n - len(chosen))).tolist()
    return chosen[:max(n, 1)]


def _title(run_id: str, row: pd.Series, keys: list[str]) -> str:
    parts = [f"{k}={row[k]}" for k in keys] or [f"run {run_id}"]
    return ", ".join(parts) + f"\n{row['verdict']}: {verdict_reason(row)}"


def _loss_frames(runs: pd.DataFrame, loss: pd.DataFrame, layout: Layout) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Small multiples: per panel (a facet combination, row; a y value, column), line (an x value) and step, the
    median loss over seeds only, every other swept key being fixed by the panel and the line; and where each
    diverged run's record ends."""
    meta = runs[["run_id", "verdict", *layout.keys]].copy()
    meta["hue"] = meta[layout.x] if layout.x else "all runs"
    meta["row"] = facet_labels(meta, layout.facets)
    meta["col"] = facet_labels(meta, [layout.y]) if layout.y else ""
    meta["row_rank"] = [tuple(layout.rank(k, v) for k, v in zip(layout.facets, vals))
                        for vals in meta[layout.facets].itertuples(index=False, name=None)] if layout.facets else 0
    meta["col_rank"] = meta[layout.y].map(lambda v: layout.rank(layout.y, v)) if layout.y else 0
    df = loss.merge(meta[["run_id", "hue", "row", "col", "row_rank", "col_rank", "verdict"]], on="run_id")
    keys = ["row", "col", "hue", "step"]
    curves = df.groupby(keys, sort=False, dropna=False)["loss"].median().reset_index()
    curves = curves.merge(df[["row", "col", "row_rank", "col_rank"]].drop_duplicates(["row", "col"]), on=["row", "col"])
    div = df[(df.verdict == "diverged")]
    ends = div.sort_values("step").groupby("run_id").tail(1)[["row", "col", "hue", "step", "loss"]]
    return curves, ends


def make_report(sweep_dir: str | Path, out: str | Path | None = None, x: str | None = None, y: str | None = None,
                facets: list[str] | None = None, stat: str = "grad_ratio",
                flow_runs: list[str] | None = None, n_flow: int | None = None, quiet: bool = False) -> Path:
    """Write the report of ``sweep_dir`` and return the path of its index.html (``text_summary`` tells the rest)."""
    from gradsweep import figures
    from gradsweep.html import write_index

    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise ReportError(f"{sweep_dir}: no such directory")
    try:
        runs = load_runs(sweep_dir, write_index=True)
    except FileNotFoundError as e:
        raise ReportError(str(e)) from None
    except (pa.ArrowException, OSError) as e:  # a torn, truncated or foreign file where a runs table should be
        raise ReportError(f"{sweep_dir}: a runs table cannot be read ({first_line(e)})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in runs.columns]
    if missing:
        raise ReportError(f"{sweep_dir} was written by an older gradsweep (no {', '.join(missing)} in its runs table); "
                          "rerun the sweep with this version")
    version = runs.attrs.get("schema_version", 1)
    if version < SCHEMA_VERSION:
        raise ReportError(f"{sweep_dir} was written by an older gradsweep (tables schema {version}, this version reads "
                          f"{SCHEMA_VERSION}: its verdicts mean something else); rerun the sweep with this version")
    out = Path(out) if out else sweep_dir / "report"
    replaced = (out / "index.html").is_file()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ReportError(f"cannot write the report to {out}: {e.strerror or e}; give another place with --out") from None
    column = STATISTICS[stat][0]
    try:
        layout = infer_layout(runs, x, y, facets, command_order(sweep_dir))
    except ValueError as e:
        raise ReportError(str(e)) from None
    vanish, explode = float(runs["verdict.vanish_below"].iloc[0]), float(runs["verdict.explode_above"].iloc[0])
    images: list[tuple[str, str, str]] = []  # (file, title, caption)
    bar = progress_bar(total=10, desc="report", unit="part", quiet=quiet, leave=False)

    sizes: dict[str, dict[str, float]] = {}

    def save(fig, name: str, title: str, caption: str) -> None:
        fig.savefig(out / name, dpi=DPI)
        # what the page's text-size check needs: the smallest font drawn and the image's width
        sizes[name] = {"min_font_pt": figures.smallest_text_pt(fig), "width_px": fig.get_figwidth() * DPI,
                       **getattr(fig, "gradsweep_info", {})}
        figures.plt.close(fig)
        images.append((name, title, caption))
        bar.update(1)

    what = STATISTICS[stat][1]
    label = "log10 ratio, first Linear over last\n<- vanishing      exploding ->"
    if "model" in runs and (runs["model"].fillna("mlp") != "mlp").any():  # a module: Linear or Conv
        what, label = what.replace("Linear", "layer"), label.replace("Linear", "Linear/Conv layer")
    layout0, blind = layout.at_step0()
    pooled0 = "seeds" + (f" and {', '.join(blind)} (which cannot change a step-0 value)" if blind else "")
    cells = aggregate(runs, layout0, column, step0=True)
    save(figures.heatmap(cells, layout0, "ratio", f"Where gradients vanish or explode at initialisation\n{what}, step 0",
                         label=label, vanish=vanish, explode=explode, step0=True),
         "heatmap_ratio.png", "Gradient ratio at initialisation",
         f"Median over {pooled0} of {column} at step 0 (runs that diverged later included: it is measured before any "
         f"update). Blue: the first layer receives less signal than the readout (vanishing); red: more (exploding). "
         f"Verdict thresholds {vanish:+g} and {explode:+g}, the black lines on the colour bar; the same colours as "
         "the through-training twin below.")
    save(figures.heatmap(aggregate(runs, layout, column + AT["training"]), layout, "ratio",
                         f"... and through training\n{what}, median over the logged steps",
                         label=label, vanish=vanish, explode=explode),
         "heatmap_ratio_training.png", "Gradient ratio through training",
         f"Median over seeds of {column + AT['training']}: each run's median over its logged steps (before any "
         "divergence). A cell that is pale at step 0 and dark here lost its signal while training; -inf: no signal "
         "reached the first layer for most of training (dead units).")
    predicted = runs["pred_grad_ratio_log10"].astype(float) if "pred_grad_ratio_log10" in runs else pd.Series([], dtype=float)
    if np.isfinite(predicted).any():
        pred_column = "pred_" + column if "pred_" + column in runs else "pred_grad_ratio_log10"
        save(figures.heatmap(aggregate(runs, layout0, pred_column, step0=True), layout0, "ratio",
                             "Predicted by mean-field theory, at initialisation",
                             label="predicted log10 ratio\n<- vanishing      exploding ->", vanish=vanish,
                             explode=explode, step0=True),
             "heatmap_predicted.png", "Gradient ratio predicted by theory",
             f"Mean-field prediction of {pred_column[5:]} (gradsweep.theory), on the same layout and colours as the "
             "measured heatmap; cells without a prediction (residual or normalised nets) are empty.")
        no_signal = int((np.isfinite(predicted) & np.isneginf(runs["grad_ratio_log10"].astype(float))).sum())
        save(figures.prediction_scatter(runs), "prediction_scatter.png", "Theory against measurement",
             "One point per run: the measured ratio at step 0 against the mean-field prediction; the dashed line is "
             "measured = predicted" + (f"; {no_signal} run{'s' if no_signal != 1 else ''} measured -inf (no signal "
                                       "reached layer 1), drawn as triangles on the bottom edge." if no_signal else "."))
    loss_cells = aggregate(runs, layout, "final_loss")
    trivial = baseline_words(runs)
    save(figures.heatmap(loss_cells, layout, "loss", "Final loss (median over seeds)", label="final loss (log scale)",
                         baseline_words=trivial),
         "heatmap_loss.png", "Final loss",
         "Loss on the whole data set after the last step; diverged runs left out. Cross-hatched: the cell's loss is "
         f"no better than the baseline ({trivial}), within verdict.stall_margin: those runs learned nothing.")
    if "test_accuracy" in runs and np.isfinite(runs["test_accuracy"].astype(float)).any():
        save(figures.heatmap(aggregate(runs, layout, "test_accuracy"), layout, "accuracy",
                             "Test accuracy (median over seeds)", label="accuracy on the held-out points"),
             "heatmap_accuracy.png", "Test accuracy", "Accuracy on the data's held-out points after the last step.")
    save(figures.heatmap(aggregate(runs, layout, column), layout, "verdict",
                         "Verdict over the whole run (most common over seeds)"),
         "heatmap_verdict.png", "Verdict",
         "Each cell's most common verdict; ties go to the worse one. diverged: NaN/Inf; dead: no signal reaches the "
         "first layer by the end of training; vanishing/exploding: the ratio beyond the thresholds at step 0 or as "
         "its median over training; stalled: the final loss no better than the baseline; healthy: none of these.")

    chosen = flow_runs or pick_flow_runs(runs, n_flow)
    by_id = runs.set_index("run_id")
    unknown = [rid for rid in chosen if rid not in by_id.index]
    if unknown:
        raise ReportError(f"--run {unknown[0]!r} is not a run of this sweep; run_ids are in summary.csv")
    run_ids = runs["run_id"].tolist()
    try:
        flow = load_steps(sweep_dir, ["run_id", "step", "layer", "layer_name", "hgrad_norm"],
                          pc.field("kind").isin(["linear", "conv"]) & pc.field("run_id").isin(chosen), run_ids=run_ids)
    except (pa.ArrowException, OSError) as e:
        raise ReportError(f"{sweep_dir}: a steps table cannot be read ({first_line(e)})") from None
    titles = {rid: _title(rid, by_id.loc[rid], layout.keys) for rid in chosen}
    save(figures.flow_maps(flow, runs, titles), "flow_maps.png", "Gradient flow",
         "Backpropagated signal per Linear (and Conv) layer and step for chosen runs (one per verdict, worst first).")

    loss = load_steps(sweep_dir, ["run_id", "step", "loss"], pc.field("layer") == 1, run_ids=run_ids)
    experiment = article_experiment(runs)
    if experiment:
        arm = next((k for k in swept_keys(runs) if k != ARTICLE_KEY), None)
        if arm is not None:
            save(figures.article_figure(loss, runs, arm, experiment), "article.png", f"The article's experiment: {experiment}",
                 article_caption(runs, arm))
            images.insert(0, images.pop())
    curves, ends = _loss_frames(runs, loss, layout)
    save(figures.loss_curves(curves, ends, layout, baseline_line(runs)), "loss_curves.png", "Loss curves",
         "Small multiples: one panel per combination of the other swept keys, one line per "
         f"{layout.x or 'run'}, each the median over seeds only; a log axis when the losses span more than two "
         "decades; the dotted line is the baseline loss; diverged runs are marked at the top, where their record ends.")

    # A learning-rate search stored in this sweep's directory (gradsweep.tune tune.out_dir=<sweep_dir>), or this
    # directory being a search's own.
    for tune_dir in (sweep_dir / TUNE_DIR, sweep_dir):
        if (tune_dir / TUNE_FIGURE_FILE).is_file() and (tune_dir / TUNE_BEST_FILE).is_file():
            shutil.copyfile(tune_dir / TUNE_FIGURE_FILE, out / "tune_stability.png")
            images.append(("tune_stability.png", "Learning-rate search", tune_caption(tune_dir / TUNE_BEST_FILE)))
            break

    swept = swept_keys(runs)
    ordered = ["run_dir", "run_id", *swept, "train.seed", "verdict", "init_verdict", "grad_ratio_log10",
               "grad_ratio_log10_median", "wgrad_ratio_log10", "wgrad_ratio_log10_median", "initial_loss", "final_loss",
               "baseline_loss", "min_loss", "diverged_step", "dead_step", "dead_layer"]
    ordered = list(dict.fromkeys(c for c in ordered if c in runs.columns))
    summary = runs[ordered + [c for c in runs.columns if c not in ordered]]
    csv_safe(summary).to_csv(out / "summary.csv", index=False)
    # The page's table: what tells runs apart and why each got its verdict; every column is in summary.csv.
    shown = [c for c in ["run_dir", *swept, "train.seed", "verdict", "init_verdict", "grad_ratio_log10",
                         "grad_ratio_log10_median", "final_loss", "diverged_step", "dead_step"]
             if c in summary.columns and (c != "train.seed" or summary[c].nunique() > 1)]
    index = write_index(out, runs=summary, shown=list(dict.fromkeys(shown)), images=images, command=sweep_command(sweep_dir),
                        counts=verdict_counts(runs), layout=layout, sweep_dir=sweep_dir)
    bar.update(1)
    bar.close()
    (out / "figures.json").write_text(json.dumps(sizes, indent=1) + "\n")
    summary_text = text_summary(runs, layout, index)
    if replaced:
        summary_text += "\n(replaced the report that was there; give --out to keep several)"
    (out / "summary.txt").write_text(summary_text + "\n")
    return index


def csv_safe(df: pd.DataFrame) -> pd.DataFrame:
    """List columns (``pred_chi``) as one-line JSON arrays: pandas would write numpy's multi-line repr."""
    out = df.copy()
    for col in out.columns:
        if out[col].map(lambda v: isinstance(v, (list, tuple, np.ndarray))).any():
            out[col] = out[col].map(lambda v: json.dumps([float(x) for x in v]) if isinstance(v, (list, tuple, np.ndarray))
                                    else v)
    return out


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, like every other bad input (argparse adds the usage)
        print(f"gradsweep.report: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    ap = _Parser(prog="python -m gradsweep.report", description=__doc__.splitlines()[0])
    ap.add_argument("sweep_dir", nargs="?", help="a sweep (or single run) directory; default: the newest under outputs/multirun")
    ap.add_argument("--out", help="where to write the report (default <sweep_dir>/report)")
    ap.add_argument("--x", help="config key on the x axis (default model.depth or the first numeric swept key)")
    ap.add_argument("--y", help="config key on the y axis (default the first categorical swept key)")
    ap.add_argument("--facet", action="append", help="config key to facet by (repeatable; default: the remaining swept keys)")
    ap.add_argument("--stat", choices=sorted(STATISTICS), default="grad_ratio", help="the heatmap's statistic")
    ap.add_argument("--run", action="append", dest="runs", help="run_id for a gradient-flow map (repeatable)")
    ap.add_argument("--flow-maps", type=int, help="how many gradient-flow maps (default: one per verdict present)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        sweep_dir = Path(args.sweep_dir) if args.sweep_dir else latest_sweep()
        index = make_report(sweep_dir, args.out, args.x, args.y, args.facet, args.stat, args.runs,
                            args.flow_maps, args.quiet)
    except ReportError as e:
        print(f"gradsweep.report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print((index.parent / "summary.txt").read_text(), end="")
    print(f"({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    from gradsweep.shutdown import run_and_exit

    run_and_exit(main)
