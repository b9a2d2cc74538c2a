"""Training data: the article's regression points, a badly scaled variant, scikit-learn's digits, Gaussian probes, and
a user's own file (``data=arrays``: .npz, .csv or .parquet)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from gradsweep.config.sections import DIGITS_CLASSES, DataCfg, is_classification
from gradsweep.engine.arrays import read_arrays


@dataclass
class Data:
    """Training points and the held-out test points (``n_test`` of them; empty tensors when 0).

    ``y`` is float (n, out) for regression-type data, int64 class indices (n,) for classification.
    """

    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    out_dim: int


def make_data(cfg: DataCfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The training points ``(X, y)``: float32 CPU tensors (y: int64 class indices for digits)."""
    d = load_data(cfg)
    return d.x, d.y


def load_data(cfg: DataCfg) -> Data:
    """Draw (or load) ``cfg``'s data.

    ``regression`` repeats the article's calls exactly: ``numpy.random.seed(0)``, ``X = randn(100, 1)``,
    ``y = 3 X + 2 + 0.5 randn(100, 1)``; a private ``RandomState`` draws the same stream without touching
    numpy's global state. Test points of generated data are drawn after all the training points.
    """
    rs = np.random.RandomState(cfg.seed)
    if cfg.name in ("regression", "scaled"):
        x, y = _regression(cfg, rs, cfg.n_samples)
        xt, yt = _regression(cfg, rs, cfg.n_test)
    elif cfg.name == "gaussian":
        x, y = rs.randn(cfg.n_samples, cfg.in_dim), rs.randn(cfg.n_samples, cfg.out_dim)
        xt, yt = rs.randn(cfg.n_test, cfg.in_dim), rs.randn(cfg.n_test, cfg.out_dim)
    elif cfg.name == "digits":
        images, labels = _digits()
        order = rs.permutation(len(labels))
        test, train = order[:cfg.n_test], order[cfg.n_test:cfg.n_test + cfg.n_samples]
        mean, std = images[train].mean(axis=0), images[train].std(axis=0)
        std[std == 0] = 1.0  # pixels that are blank in every training image stay 0
        x, xt = (images[train] - mean) / std, (images[test] - mean) / std
        y, yt = labels[train], labels[test]
    elif cfg.name == "arrays":
        return _arrays(cfg, rs)
    else:  # unreachable: DataCfg validates the name
        raise ValueError(f"data={cfg.name!r} is not valid")
    if is_classification(cfg):
        return Data(_f32(x), torch.from_numpy(y).long(), _f32(xt), torch.from_numpy(yt).long(), DIGITS_CLASSES)
    return Data(_f32(x), _f32(y), _f32(xt), _f32(yt), y.shape[1])


def _arrays(cfg: DataCfg, rs: np.random.RandomState) -> Data:
    """A user's file: its own test split, or data.n_test rows held out. Rows in the file's order when every row
    trains; else shuffled by data.seed and split as digits is. Features standardised with the training rows' mean
    and std (a constant feature stays 0); regression targets likewise with data.scale_target (else as written),
    classification targets as class indices."""
    if not cfg.digest:  # n_samples and the task are the file's once bound: unbound, the split would be wrong
        raise ValueError("a data=arrays config trains only once bound to its file (gradsweep.engine.arrays.bind_data)")
    f = read_arrays(cfg.path, cfg.target, cfg.task)
    if f.x_test is not None:
        x, y, xt, yt = f.x[:cfg.n_samples], f.y[:cfg.n_samples], f.x_test, f.y_test
    elif cfg.n_test == 0 and cfg.n_samples == len(f.x):
        x, y, xt, yt = f.x, f.y, f.x[:0], f.y[:0]
    else:
        order = rs.permutation(len(f.x))
        test, train = order[:cfg.n_test], order[cfg.n_test:cfg.n_test + cfg.n_samples]
        x, y, xt, yt = f.x[train], f.y[train], f.x[test], f.y[test]
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    x, xt = (x - mean) / std, (xt - mean) / std
    if cfg.scale_target:  # bind_data keeps it true for regression only
        mean, std = y.mean(axis=0), y.std(axis=0)
        std[std == 0] = 1.0
        y, yt = (y - mean) / std, (yt - mean) / std
    if f.task == "classification":
        return Data(_f32(x), torch.from_numpy(y).long(), _f32(xt), torch.from_numpy(yt).long(), len(f.classes))
    return Data(_f32(x), _f32(y), _f32(xt), _f32(yt), y.shape[1])


def _f32(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).float()


def _regression(cfg: DataCfg, rs: np.random.RandomState, n: int) -> tuple[np.ndarray, np.ndarray]:
    if cfg.name == "regression":
        x = rs.randn(n, 1)
        return x, 3 * x + 2 + cfg.noise * rs.randn(n, 1)
    # Unit-variance features, each stretched by its own scale: the net sees inputs whose magnitudes differ
    # by orders of magnitude, while the target depends on all equally.
    z = rs.randn(n, cfg.n_features)
    scales = np.logspace(np.log10(cfg.scale_min), np.log10(cfg.scale_max), cfg.n_features)
    y = 3 * z.sum(axis=1, keepdims=True) / np.sqrt(cfg.n_features) + 2 + cfg.noise * rs.randn(n, 1)
    return z * scales, y


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.data.astype(np.float64), d.target.astype(np.int64)


def data_shape(cfg: DataCfg) -> tuple[int, int, int]:
    """(training points, input features, outputs) of ``cfg``'s data, without drawing it."""
    return cfg.n_samples, cfg.in_dim, cfg.out_dim
