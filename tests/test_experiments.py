"""The article's experiments as presets: one command each, a real multirun, the article's figure in its report."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scaled

from gradsweep import load_sweep
from gradsweep.report.build import make_report

ROOT = Path(__file__).resolve().parent.parent
ARMS = {"activation": ("model.activation", {"sigmoid", "relu"}), "clipping": ("train.clip_norm", {None, 10.0}),
        "init": ("init", {"xavier", "kaiming"})}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", list(ARMS))
def test_preset_is_one_command_and_its_report_has_the_articles_figure(tmp_path, experiment):
    sweep = tmp_path / experiment
    r = subprocess.run([sys.executable, "-m", "gradsweep", "-m", f"+experiment={experiment}", "quiet=true",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True, timeout=scaled(600))
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


@pytest.mark.slow  # a subprocess
def test_unknown_experiment_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "gradsweep", "-m", "+experiment=dropout", f"hydra.sweep.dir={tmp_path / 's'}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=scaled(120))
    assert r.returncode == 2
    assert r.stderr.strip() == ("gradsweep: error: experiment='dropout' is not valid; "
                                "valid values: activation, clipping, edge_of_stability, init")
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_digits_sweep_end_to_end_fused_with_test_accuracy(tmp_path):
    sweep = tmp_path / "digits"
    r = subprocess.run([sys.executable, "-m", "gradsweep", "-m", "data=digits", "model.depth=2,4", "init=default,kaiming",
                        "model.width=32", "optim.lr=0.1", "train.steps=60", "quiet=true", f"hydra.sweep.dir={sweep}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=scaled(600))
    assert r.returncode == 0, r.stderr
    assert (sweep / "groups").is_dir()  # trained by the fused launcher
    runs, _ = load_sweep(sweep)
    assert len(runs) == 4 and (runs["loss"] == "cross_entropy").all()
    assert runs["test_accuracy"].between(0.0, 1.0).all()
    # Kaiming nets beat chance (0.1) by far in 60 steps; PyTorch's default init at depth 4 may still be stuck.
    assert (runs[runs["init"] == "kaiming"]["test_accuracy"] > 0.5).all()
    assert runs["test_loss"].notna().all() and runs["pred_grad_ratio_log10"].notna().all()
    index = make_report(sweep, quiet=True)
    assert (index.parent / "heatmap_accuracy.png").is_file() and "Test accuracy" in index.read_text()


@pytest.mark.slow
def test_edge_of_stability_preset_holds_the_sharpness_at_2_over_lr(tmp_path):
    """Cohen et al.'s Figure 1 on our nets, and the three phases: GD cannot rest where the sharpness exceeds
    2 / lr, so every run that did not diverge ends with sharpness_final <= 1.2 * 2 / lr (the acceptance asks it of
    the runs whose loss settled; at the edge the loss keeps oscillating, so it is asked of all of them); at least
    90% of the runs below their predicted edge show no spike above their initial loss."""
    sweep = tmp_path / "eos"
    r = subprocess.run([sys.executable, "-m", "gradsweep", "-m", "+experiment=edge_of_stability", "quiet=true",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path, capture_output=True, text=True, timeout=scaled(600))
    assert r.returncode == 0, r.stderr
    runs, steps = load_sweep(sweep)
    assert len(runs) == 30 and runs["optim.lr"].nunique() == 6 and (runs["model.activation"] == "tanh").all()
    assert runs["sharpness_converged"].all() and runs["sharpness_init"].between(1, 100).all()
    settled = runs[runs["phase"] != "diverged"]
    assert len(settled) >= 20
    assert (settled["sharpness_final"] <= 1.2 * 2 / settled["optim.lr"]).all()
    # measured through training, every 10 logged steps; it rose from lambda_0 toward 2 / lr
    one = steps[(steps["layer"] == 1) & (steps["run_id"] == settled["run_id"].iloc[0])]
    assert one["sharpness"].notna().sum() >= 1500 // 10
    far = settled[settled["lr_over_edge"] < 0.5]  # progressive sharpening, where 2 / lr is far above lambda_0
    assert len(far) >= 10 and (far["sharpness_final"] > 2 * far["sharpness_init"]).all()
    below = runs[runs["lr_over_edge"] < 1]
    assert len(below) >= 15 and (below["phase"] == "monotone").mean() >= 0.9
    assert (runs[runs["lr_over_edge"] > 1.2]["phase"] != "monotone").any()  # past the edge, something happens
    index = make_report(sweep, quiet=True)
    assert (index.parent / "sharpness.png").stat().st_size > 10_000
    assert (index.parent / "heatmap_edge.png").stat().st_size > 10_000
    page = index.read_text()
    assert "Sharpness through training" in page and f"Of the {len(below)} runs below the edge" in page
