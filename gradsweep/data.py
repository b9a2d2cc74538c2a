"""Training data: the article's regression points and a badly scaled variant."""

from __future__ import annotations

import numpy as np
import torch

from gradsweep.config import DataCfg


def make_data(cfg: DataCfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(X, y)`` as float32 CPU tensors of shape (n, in) and (n, 1).

    ``regression`` repeats the article's calls exactly: ``numpy.random.seed(0)``,
    ``X = randn(100, 1)``, ``y = 3 X + 2 + 0.5 randn(100, 1)``. A private
    ``RandomState`` draws the same stream without touching numpy's global state.
    """
    rs = np.random.RandomState(cfg.seed)
    if cfg.name == "regression":
        x = rs.randn(cfg.n_samples, 1)
        y = 3 * x + 2 + cfg.noise * rs.randn(cfg.n_samples, 1)
    elif cfg.name == "scaled":
        # Unit-variance features, each stretched by its own scale: the net sees inputs whose
        # magnitudes differ by orders of magnitude, while the target depends on all equally.
        z = rs.randn(cfg.n_samples, cfg.n_features)
        scales = np.logspace(np.log10(cfg.scale_min), np.log10(cfg.scale_max), cfg.n_features)
        x = z * scales
        y = 3 * z.sum(axis=1, keepdims=True) / np.sqrt(cfg.n_features) + 2 + cfg.noise * rs.randn(cfg.n_samples, 1)
    else:  # unreachable: DataCfg validates the name
        raise ValueError(f"data={cfg.name!r} is not valid")
    return torch.from_numpy(x).float(), torch.from_numpy(y).float()


def data_shape(cfg: DataCfg) -> tuple[int, int, int]:
    """(samples, input features, outputs) of ``make_data(cfg)``, without drawing it."""
    return cfg.n_samples, (1 if cfg.name == "regression" else cfg.n_features), 1
