"""data=arrays: a user's own .npz, .csv or .parquet file, read, checked, split and standardised like the built-in data;
bad files refused in one line naming the file and the problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import scaled

from gradsweep.config.identity import config_hash
from gradsweep.config.sections import ConfigError, DataCfg, build_run_cfg
from gradsweep.engine.arrays import bind_data, bound_run_cfg
from gradsweep.engine.data import data_shape, load_data

REPO = Path(__file__).resolve().parent.parent


def arrays(**keys) -> DataCfg:
    """A data=arrays section bound to its file, as a run's is."""
    return bind_data(DataCfg(name="arrays", **keys))


def _regression_frame(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rs = np.random.RandomState(seed)
    x = rs.randn(n, 3) * [1.0, 10.0, 0.1] + [0.0, 5.0, -1.0]
    return pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "y": x @ [1.0, -0.2, 3.0] + 0.1 * rs.randn(n)})


def _standardised(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    mean, std = train.mean(axis=0), train.std(axis=0)
    return (x - mean) / np.where(std == 0, 1.0, std)


def test_a_csv_round_trips_as_regression_data(tmp_path):
    frame = _regression_frame()
    frame.to_csv(tmp_path / "d.csv", index=False)
    cfg = arrays(path=str(tmp_path / "d.csv"), target="y", n_samples=None)
    assert (cfg.task, cfg.n_samples, len(cfg.digest)) == ("regression", 40, 16)
    d = load_data(cfg)
    x = frame[["a", "b", "c"]].to_numpy()
    # every row, in the file's order; features standardised with the training rows' mean and std, targets as written
    np.testing.assert_allclose(d.x.numpy(), _standardised(x, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d.y.numpy()[:, 0], frame["y"].to_numpy(), rtol=1e-6)
    assert d.x.dtype == torch.float32 and d.y.shape == (40, 1) and d.x_test.shape == (0, 3)
    assert data_shape(cfg) == (40, 3, 1)


def test_a_held_out_split_is_seeded_and_standardised_by_the_training_rows(tmp_path):
    frame = _regression_frame(50)
    frame.to_parquet(tmp_path / "d.parquet")
    cfg = arrays(path=str(tmp_path / "d.parquet"), target="y", n_samples=None, n_test=10, seed=3)
    d = load_data(cfg)
    order = np.random.RandomState(3).permutation(50)
    x = frame[["a", "b", "c"]].to_numpy()
    train, test = x[order[10:]], x[order[:10]]
    np.testing.assert_allclose(d.x.numpy(), _standardised(train, train), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.x_test.numpy(), _standardised(test, train), rtol=1e-5, atol=1e-6)
    assert cfg.n_samples == 40 and d.y_test.shape == (10, 1)


def test_an_npz_with_its_own_test_split_classifies_integer_labels(tmp_path):
    rs = np.random.RandomState(1)
    x, xt = rs.randn(30, 4), rs.randn(12, 4)
    y, yt = rs.randint(3, 6, 30), rs.randint(3, 6, 12)  # labels 3, 4, 5 -> classes 0, 1, 2
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=xt, y_test=yt)
    cfg = bound_run_cfg({"data": {"name": "arrays", "path": str(tmp_path / "d.npz"), "n_samples": None}})
    assert (cfg.data.task, cfg.loss) == ("classification", "cross_entropy")
    d = load_data(cfg.data)
    assert d.out_dim == 3 and d.y.dtype == torch.int64
    assert torch.equal(d.y, torch.from_numpy(y - 3)) and torch.equal(d.y_test, torch.from_numpy(yt - 3))
    np.testing.assert_allclose(d.x_test.numpy(), _standardised(xt, x), rtol=1e-5, atol=1e-6)


def test_text_labels_classify_and_task_can_be_forced(tmp_path):
    frame = _regression_frame(20)
    frame["label"] = np.where(frame["y"] > 0, "up", "down")
    frame.drop(columns="y").to_csv(tmp_path / "t.csv", index=False)
    d = load_data(arrays(path=str(tmp_path / "t.csv"), target="label", n_samples=None))
    assert d.out_dim == 2 and torch.equal(d.y, torch.from_numpy((frame["label"] == "up").to_numpy().astype(np.int64)))
    frame["k"] = (frame["y"] > 0).astype(int)
    frame.drop(columns=["y", "label"]).to_csv(tmp_path / "k.csv", index=False)
    forced = arrays(path=str(tmp_path / "k.csv"), target="k", n_samples=None, task="regression")
    assert forced.task == "regression" and load_data(forced).y.dtype == torch.float32


def test_regression_targets_are_standardised_by_the_training_rows_when_scale_target_is_set(tmp_path):
    frame = _regression_frame(50).assign(y=lambda f: 300 * f["y"] + 150)  # a target of variance ~1e5, like diabetes
    frame.to_csv(tmp_path / "d.csv", index=False)
    cfg = arrays(path=str(tmp_path / "d.csv"), target="y", n_samples=None, n_test=10,
                  scale_target=True)
    d = load_data(cfg)
    order = np.random.RandomState(0).permutation(50)
    y = frame[["y"]].to_numpy()
    np.testing.assert_allclose(d.y.numpy(), _standardised(y[order[10:]], y[order[10:]]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.y_test.numpy(), _standardised(y[order[:10]], y[order[10:]]), rtol=1e-5, atol=1e-6)
    from gradsweep.engine.losses import baseline_loss

    assert baseline_loss("mse", d.y) == pytest.approx(1.0, rel=1e-5)  # predicting the mean scores 1
    labels = pd.DataFrame({"a": np.arange(20.0), "y": np.arange(20) % 3})  # classification has no target scale
    labels.to_csv(tmp_path / "c.csv", index=False)
    assert arrays(path=str(tmp_path / "c.csv"), target="y", n_samples=None,
                   scale_target=True).scale_target is False


def test_scale_target_enters_the_run_id_only_when_set(tmp_path):
    (tmp_path / "d.csv").write_text("a,y\n0.5,1.5\n-1.0,2.0\n2.0,-0.5\n")
    data = {"name": "arrays", "path": str(tmp_path / "d.csv"), "target": "y", "n_samples": None}
    off = config_hash(bound_run_cfg({"data": {**data, "scale_target": False}}))
    assert off == "afa4d696251f520c"  # this file's runs' run_id before data.scale_target existed
    assert config_hash(bound_run_cfg({"data": {**data, "scale_target": True}})) != off
    with pytest.raises(ConfigError, match="data.scale_target=True is not valid.*False unless data=arrays"):
        DataCfg(scale_target=True)


def test_the_run_id_follows_the_files_content(tmp_path):
    frame = _regression_frame()
    frame.to_csv(tmp_path / "d.csv", index=False)
    cfg = {"data": {"name": "arrays", "path": str(tmp_path / "d.csv"), "target": "y", "n_samples": None}}
    before = config_hash(bound_run_cfg(cfg))
    frame.assign(y=frame["y"] + 1).to_csv(tmp_path / "d.csv", index=False)
    assert config_hash(bound_run_cfg(cfg)) != before


def test_boolean_and_integer_features_beside_floats(tmp_path):
    frame = pd.DataFrame({"a": [1.0, 2.0, 3.0, 4.0], "b": [True, False, True, False], "c": [1, 2, 3, 5],
                          "y": [0.1, 0.2, 0.3, 0.4]})
    frame.to_csv(tmp_path / "mixed.csv", index=False)
    frame.astype({"c": "Int64"}).to_parquet(tmp_path / "mixed.parquet")
    for name in ("mixed.csv", "mixed.parquet"):
        d = load_data(arrays(path=str(tmp_path / name), target="y", n_samples=None))
        x = frame[["a", "b", "c"]].to_numpy(dtype=np.float64)
        np.testing.assert_allclose(d.x.numpy(), _standardised(x, x), rtol=1e-6, atol=1e-6)


def test_the_run_id_does_not_depend_on_how_the_path_is_spelled(tmp_path, monkeypatch):
    _regression_frame().to_csv(tmp_path / "d.csv", index=False)
    monkeypatch.chdir(tmp_path)
    ids = {config_hash(bound_run_cfg({"data": {"name": "arrays", "path": p, "target": "y", "n_samples": None}}))
           for p in ("d.csv", "./d.csv", str(tmp_path / "d.csv"))}
    assert len(ids) == 1


def _bad_files(tmp: Path) -> list[tuple[dict, str]]:
    good = _regression_frame(10)
    good.to_csv(tmp / "good.csv", index=False)
    good.assign(b=["x"] * 10).to_csv(tmp / "text.csv", index=False)
    good.assign(c=[np.nan] + [1.0] * 9).to_csv(tmp / "nan.csv", index=False)
    (tmp / "junk.parquet").write_bytes(b"not parquet at all")
    np.savez(tmp / "short.npz", x=np.zeros((5, 2)), y=np.zeros(4))
    np.savez(tmp / "noy.npz", x=np.zeros((5, 2)))
    np.savez(tmp / "ynan.npz", x=np.zeros((6, 2)), y=np.array([1.0, np.nan, 2, 3, 4, 5]))
    np.savez(tmp / "scalar.npz", x=np.array(3.0), y=np.array(1.0))
    np.savez(tmp / "empty.npz", x=np.ones((0, 3)), y=np.ones((0,)))
    (tmp / "header.csv").write_text("a,y\n")
    (tmp / "d.txt").write_text("1,2\n")
    return [
        ({"path": str(tmp / "missing.csv"), "target": "y"}, "missing.csv'"),
        ({"path": str(tmp / "d.txt")}, "is not a .npz, .csv or .parquet file"),
        ({"path": str(tmp / "junk.parquet"), "target": "y"}, "junk.parquet cannot be read as .parquet"),
        ({"path": str(tmp / "good.csv"), "target": "z"}, "data.target='z' is not a column of good.csv; valid values: a, b, c, y"),
        ({"path": str(tmp / "good.csv")}, "data.target is required for a .csv file"),
        ({"path": str(tmp / "text.csv"), "target": "y"}, "text.csv: non-numeric feature column(s) b"),
        ({"path": str(tmp / "nan.csv"), "target": "y"}, "nan.csv: missing (NaN) values in column(s) c (1 rows)"),
        ({"path": str(tmp / "short.npz")}, "short.npz: x has 5 rows and y 4: shapes (5, 2) and (4,) do not match"),
        ({"path": str(tmp / "noy.npz")}, "noy.npz has no array y; it holds x"),
        ({"path": str(tmp / "ynan.npz")}, "ynan.npz: the target holds 1 NaN or infinite value(s)"),
        ({"path": str(tmp / "scalar.npz")}, "scalar.npz: x, y is a single value, not an array of rows"),
        ({"path": str(tmp / "empty.npz")}, "empty.npz has no rows"),
        ({"path": str(tmp / "header.csv"), "target": "y"}, "header.csv has no rows"),
        ({}, "data.path is required with data=arrays"),
        ({"path": str(tmp / "good.csv"), "target": "y", "n_samples": 11}, "data.n_samples=11 is not valid"),
    ]


def test_each_bad_file_is_one_line_naming_the_file_and_the_problem(tmp_path):
    for data, message in _bad_files(tmp_path):
        with pytest.raises(ConfigError) as e:
            bound_run_cfg({"data": {"name": "arrays", "n_samples": None, **data}})
        assert message in str(e.value) and "\n" not in str(e.value), (data, str(e.value))


@pytest.mark.slow
def test_a_sweep_on_a_csv_from_the_command_line(tmp_path):
    _regression_frame(60).to_csv(tmp_path / "mine.csv", index=False)
    sweep = tmp_path / "sweep"
    run = subprocess.run([sys.executable, "-m", "gradsweep", "-m", "data=arrays", "data.path=mine.csv", "data.target=y",
                          "optim.lr=0.01,0.1", "model.depth=3", "train.steps=30", "quiet=true", f"hydra.sweep.dir={sweep}"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=scaled(300))
    assert run.returncode == 0, run.stderr[-3000:]
    from gradsweep import load_sweep

    runs, steps = load_sweep(sweep)
    assert len(runs) == 2 and set(runs["data"]) == {"arrays"} and set(runs["data.task"]) == {"regression"}
    assert set(runs["data.path"]) == {"mine.csv"} and runs["final_loss"].notna().all()
    # data=arrays standardises regression targets by default: losses in units of their variance, the baseline 1
    assert runs["data.scale_target"].all() and np.allclose(runs["baseline_loss"], 1.0, rtol=1e-5)
    assert steps["layer"].max() == 4
    bad = subprocess.run([sys.executable, "-m", "gradsweep", "-m", "data=arrays", "data.path=mine.csv",
                          "data.target=nope", f"hydra.sweep.dir={tmp_path / 'bad'}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=scaled(300))
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()
    assert bad.stderr.strip().splitlines() == [
        "gradsweep: error: data.target='nope' is not a column of mine.csv; valid values: a, b, c, y"]


def test_building_a_config_reads_no_file_binding_it_does(tmp_path):
    missing = str(tmp_path / "missing.csv")
    data = DataCfg(name="arrays", path=missing, target="y", n_samples=None)  # constructing opens nothing
    assert (data.task, data.digest, data.n_samples) == ("auto", "", None)
    with pytest.raises(ConfigError, match="missing.csv"):
        bind_data(data)
    with pytest.raises(ValueError, match="bound_run_cfg"):  # checked whole only with the file's sizes and task
        build_run_cfg({"data": {"name": "arrays", "path": missing, "target": "y", "n_samples": None}})
    pd.DataFrame({"a": np.arange(8.0), "y": np.arange(8.0)}).to_csv(tmp_path / "d.csv", index=False)
    cfg = bound_run_cfg({"data": {"name": "arrays", "path": str(tmp_path / "d.csv"), "target": "y", "n_samples": None}})
    assert (cfg.data.task, cfg.data.n_samples, cfg.data.in_dim, cfg.loss) == ("regression", 8, 1, "mse")
    assert len(cfg.data.digest) == 16
