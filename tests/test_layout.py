"""Axis inference and aggregation over seeds, on real runs tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sweeps import grid, write_sweep

from gradsweep.report.layout import aggregate, infer_layout, swept_keys
from gradsweep.results.store import load_runs


@pytest.fixture(scope="module")
def five(tmp_path_factory):
    points = grid(**{"model.depth": [2, 3], "init": ["xavier", "kaiming"], "optim.lr": [0.01, 0.05],
                     "model.activation": ["relu", "tanh"], "train.clip_norm": [None, 1.0], "train.seed": [0, 1]})
    return load_runs(write_sweep(tmp_path_factory.mktemp("five"), points, steps=3))


def _sub(runs, **fixed):
    keep = np.ones(len(runs), bool)
    for k, v in fixed.items():
        keep &= (runs[k].isna() if v is None else runs[k] == v).to_numpy()
    return runs[keep].reset_index(drop=True)


def test_five_swept_keys(five):
    assert set(swept_keys(five)) == {"model.depth", "init", "optim.lr", "model.activation", "train.clip_norm"}
    lay = infer_layout(five)
    assert lay.x == "model.depth" and lay.y == "init"  # init precedes model.activation in the table
    assert set(lay.facets) == {"optim.lr", "model.activation", "train.clip_norm"}


@pytest.mark.parametrize("n_keys,expect_x,expect_y", [
    (0, None, None), (1, "model.depth", None), (2, "model.depth", "init"), (3, "model.depth", "init"),
    (4, "model.depth", "init")])
def test_fewer_swept_keys(five, n_keys, expect_x, expect_y):
    fixed = [("train.clip_norm", None), ("model.activation", "relu"), ("optim.lr", 0.01), ("init", "xavier"),
             ("model.depth", 2)][: 5 - n_keys]
    runs = _sub(five, **dict(fixed))
    lay = infer_layout(runs)
    assert len(swept_keys(runs)) == n_keys
    assert (lay.x, lay.y) == (expect_x, expect_y) and len(lay.keys) == n_keys


def test_numeric_only_and_explicit_axes(five):
    runs = _sub(five, init="xavier", **{"model.activation": "relu", "train.clip_norm": None, "model.depth": 2})
    lay = infer_layout(runs)
    assert (lay.x, lay.y) == ("optim.lr", None)
    lay = infer_layout(five, x="optim.lr", y="model.activation")
    assert (lay.x, lay.y) == ("optim.lr", "model.activation") and "model.depth" in lay.facets
    with pytest.raises(ValueError, match="not a column"):
        infer_layout(five, x="model.nope")


def test_preset_fields_follow_their_preset(five):
    assert "init.scheme" not in swept_keys(five) and five["init.scheme"].nunique() == 2


def test_seeds_aggregate_by_median_with_counts(five):
    lay = infer_layout(five)
    cells = aggregate(five, lay, "grad_ratio_log10")
    assert len(cells) == 32 and (cells["n"] == 2).all()
    one = cells.iloc[0]
    members = five
    for k in lay.keys:
        members = members[members[k].isna()] if pd.isna(one[k]) else members[members[k] == one[k]]
    ok = members[members.verdict != "diverged"]["grad_ratio_log10"]
    assert one["value"] == pytest.approx(np.median(ok)) and one["n"] == len(members)


def test_diverged_runs_are_not_a_number():
    runs = pd.DataFrame({"model.depth": [2, 2, 2, 4], "init": ["a"] * 4, "train.seed": [0, 1, 2, 0],
                         "grad_ratio_log10": [1.0, 9.0, 3.0, 5.0],
                         "verdict": ["healthy", "diverged", "healthy", "diverged"]})
    cells = aggregate(runs, infer_layout(runs), "grad_ratio_log10").set_index("model.depth")
    assert cells.loc[2, "value"] == 2.0 and cells.loc[2, "n_diverged"] == 1 and cells.loc[2, "verdict"] == "healthy"
    assert np.isnan(cells.loc[4, "value"]) and cells.loc[4, "verdict"] == "diverged"


def test_ties_go_to_the_worse_verdict():
    runs = pd.DataFrame({"model.depth": [2, 2], "train.seed": [0, 1], "grad_ratio_log10": [0.0, -3.0],
                         "verdict": ["healthy", "vanishing"]})
    assert aggregate(runs, infer_layout(runs), "grad_ratio_log10")["verdict"].tolist() == ["vanishing"]


def test_null_values_get_their_own_facet(five):
    lay = infer_layout(five)
    cells = aggregate(five, lay, "grad_ratio_log10")
    assert cells["facet"].nunique() == 8 and cells["facet"].str.contains("train.clip_norm=null").sum() == 16
