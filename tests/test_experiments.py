"""The article's experiments as presets: one command each, a real multirun, the article's figure in its report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gradsweep import load_sweep
from gradsweep.report import make_report

ROOT = Path(__file__).resolve().parent.parent
ARMS = {"activation": ("model.activation", {"sigmoid", "relu"}), "clipping": ("train.clip_norm", {None, 10.0}),
        "init": ("init", {"xavier", "kaiming"})}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", list(ARMS))
def test_preset_is_one_command_and_its_report_has_the_articles_figure(tmp_path, experiment):
    sweep = tmp_path / experiment
    r = subprocess.run([sys.executable, "-m", "gradsweep", "-m", f"+experiment={experiment}", "quiet=true",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    runs, _ = load_sweep(sweep)
    key, arms = ARMS[experiment]
    assert len(runs) == 10 and (runs["article"] == experiment).all()
    assert {None if v != v else v for v in runs[key]} == arms  # two arms (NaN is clip_norm=null)
    assert sorted(runs["train.seed"].astype(int).unique()) == [0, 1, 2, 3, 4]
    assert (runs["model.depth"] == 10).all() and (runs["model.width"] == 10).all()
    index = make_report(sweep, quiet=True)
    assert (index.parent / "article.png").stat().st_size > 10_000
    page = index.read_text()
    assert page.index("The article&#x27;s experiment") < page.index("Gradient ratio")  # the article's figure first
    assert "Measured: " in page


def test_unknown_experiment_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gradsweep", "-m", "+experiment=dropout", f"hydra.sweep.dir={tmp_path / 's'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == ("gradsweep: error: experiment='dropout' is not valid; "
                                "valid values: activation, clipping, init")
    assert not (tmp_path / "s").exists()
