"""The data against the article's own numpy calls."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_cfg
from reference import article_data

from gradsweep.config.sections import DataCfg
from gradsweep.engine.data import data_shape, make_data


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


def test_digits_split_standardised_and_bundled():
    from sklearn.datasets import load_digits

    from gradsweep.engine.data import load_data

    cfg = make_cfg(data={"name": "digits", "n_samples": 1438, "n_test": 359}).data
    d = load_data(cfg)
    assert d.x.shape == (1438, 64) and d.x_test.shape == (359, 64) and d.out_dim == 10
    assert d.y.dtype == torch.int64 and set(d.y.tolist()) == set(range(10))
    kept = d.x.std(dim=0) > 0
    np.testing.assert_allclose(d.x.mean(dim=0).numpy(), 0, atol=1e-5)
    np.testing.assert_allclose(d.x.std(dim=0, unbiased=False)[kept].numpy(), 1, rtol=1e-4)
    # The same images, standardised with the training points' statistics: undo it and find them in the bundle.
    raw = load_digits()
    order = np.random.RandomState(0).permutation(1797)
    train = raw.data[order[359:]]
    restored = d.x.double().numpy() * np.where(train.std(0) == 0, 1, train.std(0)) + train.mean(0)
    np.testing.assert_allclose(restored, train, atol=1e-4)
    assert d.y_test.tolist() == raw.target[order[:359]].tolist()


def test_test_points_do_not_change_the_training_points():
    a = make_data(make_cfg(data={"n_test": 0}).data)
    b = make_data(make_cfg(data={"n_test": 50}).data)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_gaussian_shapes():
    from gradsweep.engine.data import load_data

    d = load_data(make_cfg(data={"name": "gaussian", "in_dim": 7, "out_dim": 3, "n_samples": 40, "n_test": 5}, loss="mse").data)
    assert d.x.shape == (40, 7) and d.y.shape == (40, 3) and d.x_test.shape == (5, 7)


@pytest.mark.parametrize(("data", "loss", "ok"), [("digits", "mse", False), ("regression", "cross_entropy", False),
                                                   ("digits", "auto", True), ("gaussian", "projection", True)])
def test_loss_must_fit_the_data(data, loss, ok):
    from gradsweep.config.sections import ConfigError

    values = {"data": {"name": data, "n_samples": 100}, "loss": loss}
    if ok:
        assert make_cfg(**values).loss in ("cross_entropy", "projection")
    else:
        with pytest.raises(ConfigError, match=f"loss='{loss}' is not valid with data={data}"):
            make_cfg(**values)


def test_losses_equal_torch_functional():
    from torch.nn import functional as F

    from gradsweep.engine.losses import per_run_accuracy, per_run_loss

    g = torch.Generator().manual_seed(0)
    out = torch.randn(3, 8, 5, dtype=torch.float64, generator=g)
    y = torch.randn(3, 8, 5, dtype=torch.float64, generator=g)
    cls = torch.randint(0, 5, (3, 8), generator=g)
    for r in range(3):
        torch.testing.assert_close(per_run_loss("mse", out, y)[r], F.mse_loss(out[r], y[r]))
        torch.testing.assert_close(per_run_loss("cross_entropy", out, cls)[r], F.cross_entropy(out[r], cls[r]))
        torch.testing.assert_close(per_run_loss("projection", out, y)[r], (out[r] * y[r]).sum(1).mean())
        assert per_run_accuracy(out, cls)[r].item() == (out[r].argmax(1) == cls[r]).double().mean().item()
