"""The report on the sweep a practitioner runs after the quick start (135 runs): what a script can check of what a
reader sees, in headless Chromium at 1400 px."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scaled

from gradsweep.report.layout import STEP0_BLIND
from gradsweep.results.store import load_runs

SWEEP = ["model.depth=2,5,10,20,30", "model.activation=relu,tanh,sigmoid", "init=xavier,kaiming,default",
         "optim.lr=0.001,0.01,0.1"]
CSS_9PT_PX = 12.0  # 9 pt at CSS's 96 px per inch


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("big")
    sweep = root / "sweep"
    subprocess.run([sys.executable, "-m", "gradsweep", "-m", *SWEEP, "train.steps=40", "quiet=true",
                    f"hydra.sweep.dir={sweep}"], check=True, capture_output=True, cwd=root, timeout=scaled(900))
    subprocess.run([sys.executable, "-m", "gradsweep.report", str(sweep), "--quiet"], check=True, capture_output=True,
                   cwd=root, timeout=scaled(600))
    return sweep / "report"


@pytest.mark.slow
def test_the_figures_say_what_they_measure(big):
    info = json.loads((big / "figures.json").read_text())
    # One colour scale for the measured ratio at step 0, through training, and the prediction.
    assert info["heatmap_ratio.png"]["colour"] == info["heatmap_ratio_training.png"]["colour"] \
        == info["heatmap_predicted.png"]["colour"]
    # A step-0 figure is not split by keys that cannot change a step-0 value (optim.lr here).
    for name in ("heatmap_ratio.png", "heatmap_predicted.png"):
        keys = [k for k in (info[name]["x"], info[name]["y"], *info[name]["facets"]) if k]
        assert not [k for k in keys if any(k == b or k.startswith(b + ".") for b in STEP0_BLIND)], (name, keys)
    assert "optim.lr" in info["heatmap_ratio_training.png"]["facets"]  # through training it can matter
    assert info["loss_curves.png"]["log_y"]
    html = (big / "index.html").read_text()
    runs = load_runs(big.parent)
    no_signal = int((runs["grad_ratio_log10"] == float("-inf")).sum())  # born dead; none in this sweep (seen)
    assert (f"{no_signal} run" in html and "measured -inf" in html) if no_signal else "measured -inf" not in html


@pytest.mark.slow
def test_summary_csv_is_one_plain_row_per_run(big):
    with open(big / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 135
    assert all("\n" not in v for row in rows for v in row.values())
    chi = json.loads(next(r["pred_chi"] for r in rows if r["pred_chi"]))
    assert isinstance(chi, list) and all(isinstance(c, float) for c in chi)


@pytest.mark.slow
def test_no_text_under_9pt_at_1400px_and_the_table_fits(big):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian chromium is not installed (.ci/run installs it)")
    playwright = pytest.importorskip("playwright.sync_api")
    info = json.loads((big / "figures.json").read_text())
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto((big / "index.html").as_uri())
        shown = page.evaluate("Array.from(document.images).map(i => [i.getAttribute('alt'), i.src.length, "
                              "i.naturalWidth, i.getBoundingClientRect().width])")
        names = page.evaluate("Array.from(document.querySelectorAll('figcaption a')).map(a => a.textContent)")
        for name, (_, _, natural, rendered) in zip(names, shown):
            scale = rendered / natural
            smallest_px = info[name]["min_font_pt"] * 110 / 72 * scale  # figures are drawn at 110 dpi
            assert smallest_px >= CSS_9PT_PX - 0.1, (name, info[name]["min_font_pt"], scale)
        wrap = page.evaluate("(() => { const w = document.querySelector('.tablewrap'); "
                             "return [w.scrollWidth, w.clientWidth]; })()")
        assert wrap[0] <= wrap[1], wrap  # every column of the runs table is on screen, none cut off
        page.screenshot(path=str(big / "report_1400px.png"), full_page=False)
        browser.close()
