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
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from gradsweep.errors import first_line
from gradsweep.progress import bar as progress_bar
from gradsweep.report.curvature import edge_figures
from gradsweep.report.layout import AT, STATISTICS, Layout, aggregate, facet_labels, infer_layout, swept_keys
from gradsweep.report.sweepdirs import (
    ReportError,
    check_merge,
    command_order,
    find_sweeps,
    latest_sweep,
    repeat_notes,
    repeat_of,
    search_or_sweep,
    sweep_command,
)
from gradsweep.report.text import (
    ARTICLE_KEY,
    article_caption,
    article_experiment,
    baseline_line,
    baseline_words,
    console_lines,
    tune_caption,
    verdict_reason,
)
from gradsweep.results.compat import VERDICTS_SINCE
from gradsweep.results.schema import SCHEMA_VERSION, TUNE_BEST_FILE, TUNE_DIR, TUNE_FIGURE_FILE, schema_version
from gradsweep.results.store import load_steps, runs_frame, runs_table, write_runs_index
from gradsweep.results.verdicts import SEVERITY, verdict_counts

# What the report reads from every runs table; a sweep written before one of them existed cannot be reported.
REQUIRED_COLUMNS = ("run_id", "verdict", "init_verdict", "grad_ratio_log10", "grad_ratio_log10_median", "final_loss",
                    "initial_loss", "baseline_loss", "diverged_step", "dead_step", "dead_layer",
                    "verdict.vanish_below", "verdict.explode_above", "verdict.stall_margin")
DPI = 110  # figures are drawn at this resolution; fonts >= 8 pt then read >= 12 px (CSS 9 pt) unscaled
# Within a verdict, the run a flow map shows: the most telling one (column, ascending).
FLOW_CAPTION = ("Backpropagated signal per layer and step for chosen runs (one per verdict, worst first): every "
                "Linear and Conv layer, and the norm layers (LayerNorm, BatchNorm) between them, each by its name.")
FLOW_PICK = {"diverged": ("diverged_step", True), "dead": ("dead_step", True), "stalled": ("_stall", False)}


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
                flow_runs: list[str] | None = None, n_flow: int | None = None, quiet: bool = False,
                merge: bool = False) -> Path:
    """Write the report of ``sweep_dir`` and return the path of its index.html (``console_lines`` tells the rest).

    A directory holding several sweeps (a date directory) gets one report that merges them, when their commands
    set the same keys or ``merge`` asks for it. The report is written to a staging directory and moved into place
    whole: a report that fails writes nothing.
    """
    sweep_dir = search_or_sweep(Path(sweep_dir))
    sweeps = find_sweeps(sweep_dir)
    if len(sweeps) > 1:
        check_merge(sweep_dir, sweeps, merge)
    table, stale = _read_runs(sweep_dir)
    runs = runs_frame(table)
    runs["repeat_of"] = repeat_of(runs)
    out = Path(out) if out else sweep_dir / "report"
    replaced = (out / "index.html").is_file()
    stage = _stage(out)
    try:
        _write_report(stage, out, runs, sweep_dir, sweeps, x, y, facets, stat, flow_runs, n_flow, quiet, replaced)
        _publish(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if stale:
        write_runs_index(sweep_dir, table)
    return out / "index.html"


def _read_runs(sweep_dir: Path) -> tuple[pa.Table, bool]:
    """The sweep's runs table (and whether its index is stale), or the one-line reason it cannot be reported."""
    try:
        table, stale = runs_table(sweep_dir)
    except FileNotFoundError as e:
        raise ReportError(str(e)) from None
    except (pa.ArrowException, OSError) as e:  # a torn, truncated or foreign file where a runs table should be
        raise ReportError(f"{sweep_dir}: a runs table cannot be read ({first_line(e)})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise ReportError(f"{sweep_dir} was written by an older gradsweep (no {', '.join(missing)} in its runs table); "
                          "rerun the sweep with this version")
    version = schema_version(table)
    if version < VERDICTS_SINCE:
        raise ReportError(f"{sweep_dir} was written by an older gradsweep (tables schema {version}, this version reads "
                          f"{VERDICTS_SINCE} to {SCHEMA_VERSION}: its verdicts mean something else); rerun the sweep "
                          "with this version")
    return table, stale


def _stage(out: Path) -> Path:
    """A fresh directory beside ``out`` (in its nearest existing ancestor, so nothing is created before the end)."""
    parent = next(p for p in (out.parent, *out.parent.parents) if p.is_dir())
    try:
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise ReportError(f"cannot write the report to {out}: {e.strerror or e}; give another place with --out") from None


def _publish(stage: Path, out: Path) -> None:
    """Move the staged report's files into ``out`` (each replaced whole)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for f in stage.iterdir():
            os.replace(f, out / f.name)
    except OSError as e:
        raise ReportError(f"cannot write the report to {out}: {e.strerror or e}; give another place with --out") from None


def _write_report(stage: Path, out: Path, all_runs: pd.DataFrame, sweep_dir: Path, sweeps: list[Path],
                  x: str | None, y: str | None, facets: list[str] | None, stat: str, flow_runs: list[str] | None,
                  n_flow: int | None, quiet: bool, replaced: bool) -> None:
    """Every file of the report, into ``stage``; links and printed paths name ``out``."""
    from gradsweep.report import figures
    from gradsweep.report.html import write_index

    runs = all_runs[all_runs["repeat_of"] == ""].reset_index(drop=True)  # the figures show each configuration once
    order: dict[str, list[str]] = {}
    for s in sweeps:
        for k, values in command_order(s).items():
            order.setdefault(k, []).extend(v for v in values if v not in order.get(k, []))
    try:
        layout = infer_layout(runs, x, y, facets, order)
    except ValueError as e:
        raise ReportError(str(e)) from None
    bar = progress_bar(total=10, desc="report", unit="part", quiet=quiet, leave=False)
    sizes: dict[str, dict[str, float]] = {}
    images: list[tuple[str, str, str]] = []  # (file, title, caption)

    def save(fig, name: str, title: str, caption: str) -> None:
        fig.savefig(stage / name, dpi=DPI)
        # what the page's text-size check needs: the smallest font drawn and the image's width
        sizes[name] = {"min_font_pt": figures.smallest_text_pt(fig), "width_px": fig.get_figwidth() * DPI,
                       **getattr(fig, "gradsweep_info", {})}
        figures.plt.close(fig)
        images.append((name, title, caption))
        bar.update(1)

    _heatmaps(save, runs, layout, stat)
    _flows(save, runs, layout, sweep_dir, flow_runs, n_flow, repeats=len(runs) < len(all_runs))
    edge_figures(save, runs, layout, sweep_dir)
    _tune_figure(stage, images, sweep_dir)
    summary = _summary_table(all_runs, swept_keys(runs))
    csv_safe(summary).to_csv(stage / "summary.csv", index=False)
    notes = repeat_notes(all_runs)
    # The page's table: what tells runs apart and why each got its verdict; every column is in summary.csv.
    shown = [c for c in ["run_dir", *swept_keys(runs), "train.seed", "verdict", "init_verdict", "grad_ratio_log10",
                         "grad_ratio_log10_median", "final_loss", "test_accuracy", "diverged_step", "dead_step",
                         "repeat_of"]
             if c in summary.columns and (c not in ("train.seed", "repeat_of") or summary[c].nunique() > 1)
             and (c != "test_accuracy" or summary[c].notna().any())]
    merged = [(s.relative_to(sweep_dir).as_posix(), sweep_command(s)) for s in sweeps] if len(sweeps) > 1 else []
    write_index(stage, runs=summary, shown=list(dict.fromkeys(shown)), images=images, command=sweep_command(sweep_dir),
                counts=verdict_counts(runs), layout=layout, sweep_dir=sweep_dir, merged=merged, notes=notes)
    bar.update(1)
    bar.close()
    (stage / "figures.json").write_text(json.dumps(sizes, indent=1) + "\n")
    merges = [f"merges {len(merged)} sweeps: " + ", ".join(d for d, _ in merged)] if merged else []
    summary_text = "\n".join([*merges, *notes, console_lines(runs, layout, out / "index.html")])
    if replaced:
        summary_text += "\n(replaced the report that was there; give --out to keep several)"
    (stage / "summary.txt").write_text(summary_text + "\n")


def _heatmaps(save, runs: pd.DataFrame, layout: Layout, stat: str) -> None:
    """The where-it-breaks heatmaps: ratio at step 0 and through training, theory's, loss, accuracy, verdict."""
    from gradsweep.report import figures

    column = STATISTICS[stat][0]
    vanish, explode = float(runs["verdict.vanish_below"].iloc[0]), float(runs["verdict.explode_above"].iloc[0])
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
    _theory_figures(save, runs, layout0, column, vanish, explode)
    trivial = baseline_words(runs)
    save(figures.heatmap(aggregate(runs, layout, "final_loss"), layout, "loss", "Final loss (median over seeds)",
                         label="final loss (log scale)", baseline_words=trivial),
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


def _theory_figures(save, runs: pd.DataFrame, layout0: Layout, column: str, vanish: float, explode: float) -> None:
    """Mean-field theory's heatmap and its scatter against the measurement, where the sweep has predictions."""
    from gradsweep.report import figures

    predicted = runs["pred_grad_ratio_log10"].astype(float) if "pred_grad_ratio_log10" in runs else pd.Series([], dtype=float)
    if not np.isfinite(predicted).any():
        return
    pred_column = "pred_" + column if "pred_" + column in runs else "pred_grad_ratio_log10"
    save(figures.heatmap(aggregate(runs, layout0, pred_column, step0=True), layout0, "ratio",
                         "Predicted by mean-field theory, at initialisation",
                         label="predicted log10 ratio\n<- vanishing      exploding ->", vanish=vanish,
                         explode=explode, step0=True),
         "heatmap_predicted.png", "Gradient ratio predicted by theory",
         f"Mean-field prediction of {pred_column[5:]} (gradsweep.results.theory), on the same layout and colours as the "
         "measured heatmap; cells without a prediction (residual or normalised nets) are empty.")
    no_signal = int((np.isfinite(predicted) & np.isneginf(runs["grad_ratio_log10"].astype(float))).sum())
    save(figures.prediction_scatter(runs), "prediction_scatter.png", "Theory against measurement",
         "One point per run: the measured ratio at step 0 against the mean-field prediction; the dashed line is "
         "measured = predicted" + (f"; {no_signal} run{'s' if no_signal != 1 else ''} measured -inf (no signal "
                                   "reached layer 1), drawn as triangles on the bottom edge." if no_signal else "."))


def _flows(save, runs: pd.DataFrame, layout: Layout, sweep_dir: Path, flow_runs: list[str] | None,
           n_flow: int | None, repeats: bool) -> None:
    """Gradient-flow maps of the chosen runs, the article's figure where the sweep is one of its experiments, and
    the loss curves. With ``repeats`` (a run_id stored twice), each run_id's steps are kept once."""
    from gradsweep.report import figures

    chosen = flow_runs or pick_flow_runs(runs, n_flow)
    by_id = runs.set_index("run_id")
    unknown = [rid for rid in chosen if rid not in by_id.index]
    if unknown:
        raise ReportError(f"--run {unknown[0]!r} is not a run of this sweep; run_ids are in summary.csv")
    run_ids = runs["run_id"].tolist()
    try:
        flow = load_steps(sweep_dir, ["run_id", "step", "layer", "layer_name", "kind", "hgrad_norm"],
                          pc.field("run_id").isin(chosen), run_ids=run_ids)
        loss = load_steps(sweep_dir, ["run_id", "step", "loss"], pc.field("layer") == 1, run_ids=run_ids)
    except (pa.ArrowException, OSError) as e:
        raise ReportError(f"{sweep_dir}: a steps table cannot be read ({first_line(e)})") from None
    if repeats:
        flow, loss = flow.drop_duplicates(["run_id", "step", "layer_name"]), loss.drop_duplicates(["run_id", "step"])
    titles = {rid: _title(rid, by_id.loc[rid], layout.keys) for rid in chosen}
    save(figures.flow_maps(flow, runs, titles), "flow_maps.png", "Gradient flow", FLOW_CAPTION)
    experiment = article_experiment(runs)
    arm = next((k for k in swept_keys(runs) if k != ARTICLE_KEY), None) if experiment else None
    if arm is not None:
        save(figures.article_figure(loss, runs, arm, experiment), "article.png", f"The article's experiment: {experiment}",
             article_caption(runs, arm))
    curves, ends = _loss_frames(runs, loss, layout)
    save(figures.loss_curves(curves, ends, layout, baseline_line(runs)), "loss_curves.png", "Loss curves",
         "Small multiples: one panel per combination of the other swept keys, one line per "
         f"{layout.x or 'run'}, each the median over seeds only; a log axis when the losses span more than two "
         "decades; the dotted line is the baseline loss; diverged runs are marked at the top, where their record ends.")


def _tune_figure(stage: Path, images: list[tuple[str, str, str]], sweep_dir: Path) -> None:
    """A learning-rate search stored in this sweep's directory (gradsweep.tune tune.out_dir=<sweep_dir>), or this
    directory being a search's own; the article's figure, where there is one, goes first."""
    names = [name for name, _, _ in images]
    if "article.png" in names:
        images.insert(0, images.pop(names.index("article.png")))
    for tune_dir in (sweep_dir / TUNE_DIR, sweep_dir):
        if (tune_dir / TUNE_FIGURE_FILE).is_file() and (tune_dir / TUNE_BEST_FILE).is_file():
            shutil.copyfile(tune_dir / TUNE_FIGURE_FILE, stage / "tune_stability.png")
            images.append(("tune_stability.png", "Learning-rate search", tune_caption(tune_dir / TUNE_BEST_FILE)))
            break


def _summary_table(runs: pd.DataFrame, swept: list[str]) -> pd.DataFrame:
    """summary.csv: every run and column, the ones that tell runs apart and why each got its verdict first."""
    ordered = ["run_dir", "run_id", *swept, "train.seed", "verdict", "init_verdict", "grad_ratio_log10",
               "grad_ratio_log10_median", "wgrad_ratio_log10", "wgrad_ratio_log10_median", "initial_loss", "final_loss",
               "baseline_loss", "min_loss", "test_accuracy", "diverged_step", "dead_step", "dead_layer", "repeat_of"]
    ordered = list(dict.fromkeys(c for c in ordered if c in runs.columns))
    return runs[ordered + [c for c in runs.columns if c not in ordered]]


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
    ap.add_argument("--merge", action="store_true",
                    help="report the sweeps under sweep_dir together even when their commands set different keys")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        sweep_dir = Path(args.sweep_dir) if args.sweep_dir else latest_sweep()
        index = make_report(sweep_dir, args.out, args.x, args.y, args.facet, args.stat, args.runs,
                            args.flow_maps, args.quiet, args.merge)
    except ReportError as e:
        print(f"gradsweep.report: error: {e}", file=sys.stderr)
        sys.exit(2)
    print((index.parent / "summary.txt").read_text(), end="")
    print(f"({time.perf_counter() - t0:.1f} s)")

