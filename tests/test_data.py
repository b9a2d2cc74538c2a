"""The data against the article's own numpy calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_cfg
from reference import article_data

from gradsweep.config import DataCfg
from gradsweep.data import data_shape, make_data


def test_regression_is_the_articles_data_exactly():
    x, y = make_data(DataCfg())
    rx, ry = article_data()
    assert x.dtype == torch.float32 and x.shape == (100, 1) and y.shape == (100, 1)
    assert torch.equal(x, rx) and torch.equal(y, ry)


def test_numpy_global_state_untouched():
    np.random.seed(42)
    expected = np.random.rand(3)
    np.random.seed(42)
    make_data(DataCfg())
    assert np.array_equal(np.random.rand(3), expected)


def test_scaled_features_span_orders_of_magnitude():
    x, y = make_data(DataCfg(name="scaled", n_features=4, scale_min=1e-3, scale_max=1e3))
    assert x.shape == (100, 4) and y.shape == (100, 1)
    std = x.std(dim=0).numpy()
    assert np.all(np.diff(np.log10(std)) > 1.5)  # each feature ~100x the scale of the previous
    assert 1e-4 < std[0] < 1e-2 and 1e2 < std[-1] < 1e4
    # The target depends on every feature equally once rescaled, so no feature can be ignored.
    z = x.numpy() / np.logspace(-3, 3, 4)
    coef = np.linalg.lstsq(np.c_[z, np.ones(100)], y.numpy(), rcond=None)[0][:4, 0]
    np.testing.assert_allclose(coef, 1.5, atol=0.2)


@pytest.mark.parametrize("data", [{}, {"name": "scaled", "n_features": 7, "n_samples": 33}])
def test_data_shape_without_drawing(data):
    cfg = make_cfg(data=data).data
    x, y = make_data(cfg)
    assert data_shape(cfg) == (x.shape[0], x.shape[1], y.shape[1])
