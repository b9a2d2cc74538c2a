"""The parquet tables: schema, divergence trimming, load_sweep, and readers other than pandas."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import make_cfg, scaled

from gradsweep import load_sweep
from gradsweep.config.identity import config_hash
from gradsweep.engine.train import train_group
from gradsweep.results.schema import RESULT_COLUMNS, STEP_COLUMNS
from gradsweep.results.store import write_tables
from gradsweep.results.tables import build_tables


def _group():
    cfgs = [make_cfg(model={"depth": 6}, init={"name": "large", "scheme": "normal", "std": 10.0}, optim={"lr": 0.1},
                     train={"steps": 30}),
            make_cfg(model={"depth": 6}, train={"steps": 30, "seed": 1}, optim={"lr": 0.02})]
    return cfgs, train_group(cfgs)


def test_tables_shape_and_divergence_trimming():
    cfgs, trace = _group()
    runs, steps = build_tables(cfgs, trace, [{"job_num": 0, "override_dirname": "a"}, {"job_num": 1}])
    assert list(runs.columns[:3]) == ["run_id", "job_num", "override_dirname"]
    assert set(RESULT_COLUMNS) <= set(runs.columns)
    assert list(steps.columns) == list(STEP_COLUMNS)
    d = int(runs.loc[0, "diverged_step"])
    assert runs.loc[0, "verdict"] == "diverged" and pd.isna(runs.loc[1, "diverged_step"])
    first = steps[steps.run_id == runs.loc[0, "run_id"]]
    assert first.step.max() == d  # rows stop at the step where the run diverged
    assert len(first) == (d + 1) * 7 and len(steps[steps.run_id == runs.loc[1, "run_id"]]) == 30 * 7
    assert runs.loc[1, "run_id"] == config_hash(cfgs[1])
    assert runs.loc[0, "model.depth"] == 6 and runs.loc[0, "init"] == "large" and runs.loc[0, "init.std"] == 10.0
    assert np.isclose(runs.loc[1, "min_loss"], min(steps[steps.run_id == runs.loc[1, "run_id"]].loss.min(),
                                                    runs.loc[1, "final_loss"]))


def test_grad_ratio_is_first_over_last_backprop_signal():
    cfgs, trace = _group()
    runs, steps = build_tables(cfgs, trace)
    s0 = steps[(steps.run_id == runs.loc[1, "run_id"]) & (steps.step == 0)].set_index("layer")
    expected = np.log10(s0.loc[1, "hgrad_norm"] / s0.loc[7, "hgrad_norm"])
    assert runs.loc[1, "grad_ratio_log10"] == pytest.approx(expected, rel=1e-12)
    expected_w = np.log10(s0.loc[1, "wgrad_norm"] / s0.loc[7, "wgrad_norm"])
    assert runs.loc[1, "wgrad_ratio_log10"] == pytest.approx(expected_w, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backprop_ratio_tells_xavier_from_kaiming_at_depth_30(seed):
    # The trap in the issue: the verdict rests on the backpropagated signal, which vanishes under Xavier
    # for a deep ReLU net and stays put under Kaiming.
    cfgs = [make_cfg(model={"depth": 30}, init={"name": n, "scheme": n}, train={"steps": 1, "seed": seed})
            for n in ("xavier", "kaiming")]
    runs, _ = build_tables(cfgs, train_group(cfgs))
    assert runs.init_verdict.tolist() == ["vanishing", "healthy"]  # one step: the step-0 measurement
    assert runs.loc[0, "grad_ratio_log10"] < runs.loc[1, "grad_ratio_log10"] - 2


def test_write_and_load_roundtrip(tmp_path):
    cfgs, trace = _group()
    runs, steps = build_tables(cfgs, trace)
    for r in range(2):
        write_tables(tmp_path / "sweep" / str(r), runs.iloc[[r]], steps[steps.run_id == runs.run_id[r]])
    (tmp_path / "sweep" / "multirun.yaml").write_text("not a run\n")
    got_runs, got_steps = load_sweep(tmp_path / "sweep")
    assert got_runs.run_dir.tolist() == ["0", "1"]
    assert len(got_steps) == len(steps)
    pd.testing.assert_frame_equal(got_steps, steps.reset_index(drop=True), check_dtype=False)
    assert str(got_runs["diverged_step"].dtype) == "Int64" and pd.isna(got_runs.loc[1, "diverged_step"])
    one_runs, one_steps = load_sweep(tmp_path / "sweep" / "1")
    assert len(one_runs) == 1 and one_runs.run_dir.tolist() == ["."] and set(one_steps.run_id) == {runs.run_id[1]}
    schema = pq.read_schema(tmp_path / "sweep" / "0" / "runs.parquet")
    assert str(schema.field("model.depth").type) == "int64" and str(schema.field("train.clip_norm").type) == "double"
    assert pq.ParquetFile(tmp_path / "sweep" / "0" / "steps.parquet").metadata.row_group(0).column(0).compression == "ZSTD"
    assert not list((tmp_path / "sweep").rglob(".*tmp*"))


def test_other_readers(tmp_path):
    polars = pytest.importorskip("polars")
    duckdb = pytest.importorskip("duckdb")
    cfgs, trace = _group()
    runs, steps = build_tables(cfgs, trace)
    write_tables(tmp_path, runs, steps)
    assert polars.read_parquet(tmp_path / "steps.parquet").height == len(steps)
    rows = duckdb.sql(f"select verdict, \"model.depth\" from '{tmp_path / 'runs.parquet'}' order by verdict").fetchall()
    assert rows == sorted(zip(runs.verdict, runs["model.depth"]))


def test_load_sweep_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_sweep(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no gradsweep runs"):
        load_sweep(tmp_path)


def test_extra_tag_columns_survive_mixed_sweeps(tmp_path):
    a = make_cfg(model={"depth": 2}, train={"steps": 3})
    b = make_cfg(model={"depth": 2}, train={"steps": 3, "seed": 5})
    b.extra["tag"] = "baseline"
    for i, cfg in enumerate((a, b)):
        runs, steps = build_tables([cfg], train_group([cfg]))
        write_tables(tmp_path / str(i), runs, steps)
    got, _ = load_sweep(tmp_path)
    assert pd.isna(got.loc[0, "tag"]) and got.loc[1, "tag"] == "baseline"


def test_runs_index_is_used_only_while_fresh(tmp_path):
    import os

    from gradsweep.results.schema import RUNS_INDEX
    from gradsweep.results.store import load_runs

    cfgs, trace = _group()
    runs, steps = build_tables(cfgs, trace)
    for r in range(2):
        write_tables(tmp_path / str(r), runs.iloc[[r]], steps[steps.run_id == runs.run_id[r]])
    first = load_runs(tmp_path, write_index=True)
    index = tmp_path / RUNS_INDEX
    assert index.exists()
    pd.testing.assert_frame_equal(load_runs(tmp_path), first)
    # A run rewritten after the index: the index is stale and not used.
    changed = runs.iloc[[1]].assign(verdict="healthy")
    write_tables(tmp_path / "1", changed, steps[steps.run_id == runs.run_id[1]])
    os.utime(index, ns=(0, 0))
    assert load_runs(tmp_path).verdict.tolist() == [runs.verdict[0], "healthy"]
    # A run added after the index (a resumed sweep): not in the index, so the files are read.
    write_tables(tmp_path / "2", runs.iloc[[0]], steps[steps.run_id == runs.run_id[0]])
    os.utime(index)  # even with the index newest, its list of runs no longer matches
    assert load_runs(tmp_path).run_dir.tolist() == ["0", "1", "2"]


def test_group_files_read_like_run_files(tmp_path):
    from gradsweep.results.schema import GROUPS_DIR
    from gradsweep.results.store import load_runs, write_group, write_job_dirs

    cfgs, trace = _group()
    runs, steps = build_tables(cfgs, trace, [{"job_num": 0}, {"job_num": 1}])
    for r in range(2):  # the per-run layout, as a basic-launcher sweep writes it
        write_tables(tmp_path / "basic" / str(r), runs.iloc[[r]], steps[steps.run_id == runs.run_id[r]])
    fused = tmp_path / "fused"
    dirs = [fused / "1", fused / "0"]  # a group's run order need not be the sweep's
    order = [1, 0]
    rows = runs.iloc[order].reset_index(drop=True)
    part = pd.concat([steps[steps.run_id == runs.run_id[i]] for i in order], ignore_index=True)
    assert write_job_dirs(dirs, [({"a": 1}, ["x=1"])] * 2, ".hydra") == [None, None]
    write_group(fused / GROUPS_DIR / "0", dirs, rows, part)
    (rb, sb), (rf, sf) = load_sweep(tmp_path / "basic"), load_sweep(fused)
    pd.testing.assert_frame_equal(rf, rb)
    pd.testing.assert_frame_equal(sf, sb)
    one_runs, one_steps = load_sweep(fused / "1")  # one run of a fused sweep: its rows from its group's files
    assert one_runs.run_dir.tolist() == ["."] and one_runs.run_id.tolist() == [runs.run_id[1]]
    pd.testing.assert_frame_equal(one_steps, sb[sb.run_id == runs.run_id[1]].reset_index(drop=True))
    assert load_runs(fused / "1", write_index=True).run_id.tolist() == [runs.run_id[1]]


def test_a_run_whose_directory_cannot_be_written_fails_alone(tmp_path):
    from gradsweep.results.store import write_job_dirs

    (tmp_path / "blocked").write_text("a file where the run's directory should be")
    failures = write_job_dirs([tmp_path / "blocked", tmp_path / "ok"], [({"a": 1}, ["x=1"])] * 2, ".hydra")
    assert isinstance(failures[0], OSError) and failures[1] is None
    assert (tmp_path / "ok" / ".hydra" / "config.yaml").read_text() == "a: 1\n"


@pytest.mark.slow  # a subprocess
def test_load_sweep_reads_parquet_without_importing_torch(tmp_path):
    """Reading a sweep is pandas and pyarrow only (torch takes seconds to import on a busy machine)."""
    import subprocess
    import sys

    cfgs = [make_cfg(model={"depth": 2}, train={"steps": 3})]
    write_tables(tmp_path, *build_tables(cfgs, train_group(cfgs)))
    code = f"import sys, gradsweep; gradsweep.load_sweep({str(tmp_path)!r}); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(120))
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_select_by_keyword_stands_for_the_dotted_columns():
    from gradsweep import select

    runs = pd.DataFrame({"model.depth": [2, 10, 30, 30], "init": ["xavier", "kaiming", "kaiming", "xavier"],
                         "optim.lr": [0.01, 0.1, 0.01, 0.1], "verdict": ["healthy", "healthy", "dead", "vanishing"]})
    assert select(runs, model_depth=30).index.tolist() == runs.query("`model.depth` == 30").index.tolist() == [2, 3]
    assert select(runs, model_depth=30, init="kaiming").verdict.tolist() == ["dead"]
    assert select(runs, optim_lr=[0.1], verdict=("healthy", "dead")).index.tolist() == [1]
    with pytest.raises(KeyError, match="'model_colour' names no column"):
        select(runs, model_colour="red")


def test_select_matches_every_underscore_against_the_real_columns_and_names_the_closest():
    """``model_net_depth`` is ``model.net.depth`` (not ``model.net_depth``); a typo names the near columns only."""
    from gradsweep import select

    many = {f"train.key{i}": [0, 0] for i in range(70)}
    runs = pd.DataFrame({"model.net.depth": [4, 16], "model.net._target_": ["m.A", "m.A"], "final_loss": [0.1, 0.2],
                         "data.n_samples": [8, 8], **many})
    assert select(runs, model_net_depth=16).final_loss.tolist() == [0.2]
    assert len(select(runs, model_net__target_="m.A", data_n_samples=8)) == 2
    assert len(select(runs, final_loss=0.1)) == 1
    with pytest.raises(KeyError) as err:
        select(runs, model_net_dept=16)
    message = str(err.value)
    assert "closest: model.net.depth" in message and "train.key5" not in message, message
    runs["model.net_depth"] = [1, 2]
    with pytest.raises(KeyError, match="could name any of model.net.depth, model.net_depth"):
        select(runs, model_net_depth=16)


def test_a_trial_whose_group_another_trial_cleaned_loses_its_job_dir_too(tmp_path):
    """Two trials of one interrupted group: cleaning the first removes the group; cleaning the second still removes
    its job directory (the group being gone already means it never completed)."""
    from gradsweep.results.schema import GROUPS_DIR
    from gradsweep.results.store import discard_incomplete

    (tmp_path / GROUPS_DIR / "6").mkdir(parents=True)
    for n in (6, 7):
        (tmp_path / "trials" / str(n) / ".hydra").mkdir(parents=True)
    for n in (6, 7):
        discard_incomplete(tmp_path, groups=["6"], run_dirs=[tmp_path / "trials" / str(n)])
    assert not (tmp_path / GROUPS_DIR / "6").exists()
    assert not any((tmp_path / "trials").iterdir())
