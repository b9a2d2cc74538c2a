"""The report end to end on real sweeps: full, partial, diverged, one run, five swept keys; the HTML in Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import scaled
from sweeps import grid, write_sweep

from gradsweep.report.build import main, make_report

REPO = Path(__file__).resolve().parent.parent
FILES = ["heatmap_ratio.png", "heatmap_ratio_training.png", "heatmap_predicted.png", "prediction_scatter.png",
         "heatmap_loss.png", "heatmap_verdict.png",
         "flow_maps.png", "loss_curves.png", "heatmap_edge.png",
         "summary.csv", "index.html"]


@pytest.fixture(scope="module")
def partial(tmp_path_factory):
    """depth x init x seed with one job missing and the std-10 init diverging at lr 0.1."""
    root = tmp_path_factory.mktemp("partial")
    points = grid(**{"model.depth": [2, 6], "init": ["kaiming", "large"], "train.seed": [0, 1]})
    write_sweep(root, points, steps=30)
    for job in ("0", "1"):  # depth 2 with kaiming: as if both its jobs never finished
        shutil.rmtree(root / job)
    return root


def test_partial_sweep_with_diverged_runs(partial):
    index = make_report(partial, quiet=True)
    out = index.parent
    assert all((out / f).stat().st_size > 0 for f in FILES)
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 6 and "diverged" in set(summary.verdict)
    assert list(summary.columns[:4]) == ["run_dir", "run_id", "model.depth", "init"]
    html = index.read_text()
    assert "(no Hydra record of the command)" in html  # written by the tests, not by Hydra
    assert "diverged" in html and html.count("<img") == len(FILES) - 2 and "http" not in html.replace("http-equiv", "")


def test_single_run(tmp_path):
    write_sweep(tmp_path, [{}], steps=5)
    index = make_report(tmp_path / "0", quiet=True)
    assert all((index.parent / f).exists() for f in FILES)
    assert len(pd.read_csv(index.parent / "summary.csv")) == 1


@pytest.mark.slow  # a 5-key sweep and its full report: ~20 s
def test_five_keys_and_options(tmp_path):
    points = grid(**{"model.depth": [2, 3], "init": ["xavier", "kaiming"], "optim.lr": [0.01, 0.05],
                     "model.activation": ["relu", "tanh"], "train.clip_norm": [None, 1.0]})
    write_sweep(tmp_path, points, steps=4)
    index = make_report(tmp_path, out=tmp_path / "r1", quiet=True)
    assert index.parent == tmp_path / "r1"
    index = make_report(tmp_path, out=tmp_path / "r2", x="optim.lr", y="model.activation", facets=["init"],
                        stat="wgrad_ratio", n_flow=2, quiet=True)
    assert (index.parent / "heatmap_ratio.png").exists()


def test_errors_are_one_line(tmp_path, capsys):
    for args in ([str(tmp_path / "missing")], [str(tmp_path)], [str(tmp_path), "--x", "model.nope"]):
        if args[-1] == "model.nope":
            write_sweep(tmp_path, [{}], steps=2)
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("gradsweep.report: error:") and len(err.splitlines()) == 1
    assert not (tmp_path / "missing").exists()


@pytest.mark.slow  # a subprocess
def test_cli_prints_a_summary(partial):
    out = subprocess.run([sys.executable, "-m", "gradsweep.report", str(partial), "--quiet"], capture_output=True,
                         text=True, timeout=scaled(300))
    assert out.returncode == 0, out.stderr
    assert "6 runs:" in out.stdout and "diverged" in out.stdout and "index.html" in out.stdout


def test_html_in_headless_chromium(partial):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    index = make_report(partial, quiet=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        requests: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: requests.append(r.url))
        page.goto(index.as_uri())
        images = page.evaluate("Array.from(document.images).map(i => [i.complete, i.naturalWidth])")
        assert len(images) == len(FILES) - 2 and all(ok and width > 100 for ok, width in images)
        # Sorting: the verdict header sorts ascending, then descending.
        verdicts = sorted(pd.read_csv(index.parent / "summary.csv").verdict)
        col = page.evaluate("Array.from(document.querySelectorAll('th')).map(t => t.textContent).indexOf('verdict')")
        header = page.locator("th").nth(col)
        first = page.locator("tbody tr").first.locator("td").nth(col)
        header.click()
        assert first.inner_text() == verdicts[0]
        header.click()
        assert first.inner_text() == verdicts[-1]
        page.screenshot(path=str(index.parent / "report_index.png"), full_page=True)  # beside the report, not the checkout
        browser.close()
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests


def test_one_swept_key(tmp_path):
    write_sweep(tmp_path, grid(**{"model.activation": ["sigmoid", "relu", "tanh"]}), steps=5)
    index = make_report(tmp_path, quiet=True)
    assert "x = <code>model.activation</code>, y = <code>None</code>" in index.read_text()


def test_flow_maps_default_to_one_per_verdict_worst_first():
    from gradsweep.report.build import pick_flow_runs

    runs = pd.DataFrame({"run_id": list("abcdefghij"),
                         "verdict": ["healthy", "vanishing", "vanishing", "diverged", "healthy", "diverged", "dead", "dead",
                                     "stalled", "stalled"],
                         "grad_ratio_log10": [0.1, -3.0, -5.0, 1.0, -0.5, 2.0, -0.4, -0.2, 0.0, 0.3],
                         "diverged_step": [None, None, None, 7, None, 2, None, None, None, None],
                         "dead_step": [None] * 6 + [40, 1, None, None],
                         "final_loss": [0.1] * 8 + [9.9, 12.0], "baseline_loss": [9.76] * 10})
    # diverged earliest, dead earliest, most vanishing, the stalled run furthest above its baseline, most extreme healthy
    assert pick_flow_runs(runs) == ["f", "h", "c", "j", "e"]
    assert pick_flow_runs(runs, 7) == ["f", "h", "c", "j", "e", "d", "g"]


def test_scatter_counts_runs_without_signal_and_overlapping_points():
    from gradsweep.report import figures

    runs = pd.DataFrame({"model.activation": ["relu"] * 6, "init": ["kaiming"] * 6,
                         "pred_grad_ratio_log10": [-1.0, -1.0, -2.0, -3.0, -4.0, np.nan],
                         "grad_ratio_log10": [-1.1, -1.1, -2.2, -np.inf, -np.inf, -0.5],
                         "pred_wgrad_ratio_log10": [0.1] * 6, "wgrad_ratio_log10": [0.1] * 6})
    fig = figures.prediction_scatter(runs)
    title = fig.axes[0].get_title()
    assert "5 runs with a prediction, 2 measured -inf" in title and "3 finite points, 2 distinct" in title
    figures.plt.close(fig)


def _multirun(sweep: Path, task: list[str]) -> Path:
    """Hydra's record of a multirun command in ``sweep`` (what find_sweeps and command_keys read)."""
    from omegaconf import OmegaConf

    OmegaConf.save(OmegaConf.create({"hydra": {"overrides": {"task": task}}}), sweep / "multirun.yaml")
    return sweep


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory):
    """A date directory holding the same two-run sweep twice (every run_id twice) and one sweep of another key."""
    day = tmp_path_factory.mktemp("day")
    for name in ("14-18-20", "14-18-25"):
        _multirun(write_sweep(day / name, grid(**{"model.depth": [2, 3]}), steps=5), ["model.depth=2,3"])
    _multirun(write_sweep(day / "15-00-00" / "x", grid(**{"optim.lr": [0.01, 0.02]}), steps=5).parent,
              ["optim.lr=0.01,0.02"])
    return day


def test_a_directory_of_same_key_sweeps_is_one_merged_report_with_repeats_named(two_sweeps, tmp_path):
    day = tmp_path / "day"
    shutil.copytree(two_sweeps, day, ignore=shutil.ignore_patterns("15-00-00"))
    index = make_report(day, quiet=True)
    text = (index.parent / "summary.txt").read_text()
    assert "merges 2 sweeps: 14-18-20, 14-18-25" in text
    assert "2 of 4 runs repeat a configuration run before" in text and "\n2 runs: " in text
    summary = pd.read_csv(index.parent / "summary.csv", keep_default_na=False)
    assert len(summary) == 4 and (summary.repeat_of != "").sum() == 2
    first = summary.set_index("run_dir")
    for _, row in summary[summary.repeat_of != ""].iterrows():  # each repeat names its first run, of the same id
        assert first.loc[row.repeat_of, "run_id"] == row.run_id and row.run_dir.startswith("14-18-25/")
    html = index.read_text()
    assert "This report merges 2 sweeps" in html and "14-18-20" in html and "model.depth=2,3" in html


def test_unrelated_sweeps_are_not_merged_and_nothing_is_written(two_sweeps, tmp_path, capsys):
    day = tmp_path / "day"
    shutil.copytree(two_sweeps, day)
    before = sorted(p.relative_to(day) for p in day.rglob("*"))
    with pytest.raises(SystemExit) as e:
        main([str(day), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and len(err.splitlines()) == 1
    assert "holds 3 sweeps whose commands set different keys" in err and "15-00-00: optim.lr" in err
    assert "--merge" in err
    assert sorted(p.relative_to(day) for p in day.rglob("*")) == before  # no report/, no runs-index.parquet
    index = make_report(day, quiet=True, merge=True)
    assert "merges 3 sweeps" in (index.parent / "summary.txt").read_text()


def test_a_report_that_fails_part_way_writes_nothing(two_sweeps, tmp_path, capsys):
    sweep = tmp_path / "s"
    shutil.copytree(two_sweeps / "14-18-20", sweep)
    before = sorted(p.relative_to(sweep) for p in sweep.rglob("*"))
    with pytest.raises(SystemExit):  # the heatmaps are drawn before the unknown --run is found
        main([str(sweep), "--quiet", "--run", "nope"])
    assert "'nope' is not a run of this sweep" in capsys.readouterr().err
    assert sorted(p.relative_to(sweep) for p in sweep.rglob("*")) == before
    assert not list(tmp_path.glob(".report.tmp-*"))
    make_report(sweep, quiet=True)  # and a report that succeeds writes its files and the runs index
    assert (sweep / "report" / "index.html").is_file() and (sweep / "runs-index.parquet").is_file()


def test_flow_maps_draw_norm_layers_in_order():
    from gradsweep.report.figures.flow import _ordered_layers

    # the built-in MLP numbers norm<k> with the linear<k> it follows; a module numbers every layer
    mlp = pd.DataFrame({"layer": [1, 1, 2, 2, 3], "kind": ["linear", "norm"] * 2 + ["linear"],
                        "layer_name": ["linear1", "norm1", "linear2", "norm2", "linear3"]})
    rows, names = _ordered_layers(mlp)
    assert rows.layer.tolist() == [1, 2, 3, 4, 5]
    assert names == {1: "linear1", 2: "norm1", 3: "linear2", 4: "norm2", 5: "linear3"}
    plain = mlp[mlp.kind == "linear"]
    rows, names = _ordered_layers(plain)
    assert rows.layer.tolist() == [1, 2, 3] and names == {}


def test_norm_layers_are_in_the_flow_map(tmp_path):
    write_sweep(tmp_path, grid(**{"model.depth": [2, 3]}), steps=5, model={"norm": "layernorm"})
    index = make_report(tmp_path, quiet=True)
    layers = json.loads((index.parent / "figures.json").read_text())["flow_maps.png"]["layers"]
    assert [names[:3] for names in layers.values()] == [["linear1", "norm1", "linear2"]] * len(layers)


def _boxes_apart(fig, a, b) -> bool:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    return not a.get_window_extent(renderer).overlaps(b.get_window_extent(renderer))


def test_a_narrow_sweeps_verdict_title_is_wrapped_inside_its_figure():
    """One depth, one init: the figure is ~3.5 in wide; its title wraps rather than running off both sides."""
    from gradsweep.report import figures
    from gradsweep.report.layout import aggregate, infer_layout

    runs = pd.DataFrame({"model.depth": [2, 2], "seed": [0, 1], "verdict": ["healthy", "healthy"],
                         "grad_ratio_log10": [0.1, 0.2], "final_loss": [0.5, 0.4], "baseline_loss": [1.0, 1.0]})
    layout = infer_layout(runs)
    fig = figures.heatmap(aggregate(runs, layout, "grad_ratio_log10"), layout, "verdict",
                          "Verdict over the whole run (most common over seeds)")
    fig.canvas.draw()
    title = fig._suptitle.get_window_extent(fig.canvas.get_renderer())
    assert "\n" in fig._suptitle.get_text()
    fig2 = figures.heatmap(aggregate(runs, layout, "grad_ratio_log10"), layout, "ratio", "Where it breaks\nlog10 ratio")
    assert fig2._suptitle.get_text() == "Where it breaks\nlog10 ratio"  # its own line breaks are kept
    figures.plt.close(fig2)
    assert title.x0 >= 0 and title.x1 <= fig.bbox.width, (title, fig.bbox)
    figures.plt.close(fig)


def test_the_stability_plots_footnote_sits_below_its_x_label():
    from gradsweep.report import figures
    from gradsweep.tune.results import EDGE_DEFINITION, trial_counts

    trials = pd.DataFrame({"number": range(6), "state": ["COMPLETE"] * 5 + ["FAIL"],
                           "lr": [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 3.0], "value": [0.5, 0.3, 0.2, 0.9, np.inf, np.nan],
                           "feasible": [True, True, True, False, False, False],
                           "verdict": ["healthy", "healthy", "healthy", "exploding", "diverged", None],
                           "diverged": [False] * 4 + [True, False],
                           "phase": ["monotone", "monotone", "catapult", "catapult", "diverged", None]})
    summary = {"study_name": "s", "trials": 6, "feasible": 3, "diverged": 1, "counts": trial_counts(trials),
               "objective": "final_loss", "best": {"lr": 1e-2, "loss": 0.2},
               "edge": {"smallest_stable_lr": 1e-4, "largest_stable_lr": 1e-2, "smallest_unstable_lr_above": 0.1,
                        "largest_unstable_lr_below": None}, "edge_definition": EDGE_DEFINITION}
    fig = figures.stability_plot(trials, summary)
    footnote = next(t for t in fig.texts if t.get_text().startswith(EDGE_DEFINITION.split()[0]))
    rug = fig.axes[1]  # the phases' strip, under the plot, carries the x label and the phases' legend
    assert _boxes_apart(fig, footnote, rug.xaxis.label) and _boxes_apart(fig, footnote, rug.get_legend())
    title = fig.axes[0].get_title()
    assert all(f"{n} {k}" in title for k, n in summary["counts"].items()), title  # every trial counted, as printed
    figures.plt.close(fig)
