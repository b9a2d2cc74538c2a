"""Mean-field predictions against closed forms, converged quadrature, PyTorch's own init, and measurement."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cfg, scaled

from gradsweep.config.sections import InitCfg
from gradsweep.engine.mlp import new_linear
from gradsweep.engine.train import train_group
from gradsweep.results.tables import build_tables
from gradsweep.results.theory import KINKED, SMOOTH, _adaptive, _laguerre, _rule, gaussian_mean, predict, weight_variance

QS = [1e-6, 1e-3, 0.1, 1.0, 3.7, 16.0, 100.0, 1e4]


def test_a_relu_prediction_does_not_import_scipy_special():
    # ~0.5 s of a sweep's fixed cost: the ReLU family's rules are numpy's (scipy stays for GELU's erf and the
    # adaptive fallback).
    code = ("import sys\nsys.path.insert(0, 'tests')\nfrom conftest import make_cfg\n"
            "from gradsweep.results.theory import predict\n"
            "for a in ('relu', 'elu', 'tanh'):\n"
            "    assert not isinstance(predict(make_cfg(model={'activation': a}), 1.0, 64, 10), str)\n"
            "print('scipy.special' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(120),
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == ["False"], out.stderr[-2000:]


@pytest.mark.parametrize("n", [1, 2, 7, 100, 200])
@pytest.mark.parametrize("alpha", [-0.5, 0.0, 1.5])
def test_gauss_laguerre_rule_is_scipys_and_exact_on_moments(n, alpha):
    """The numpy rule (no scipy.special import on a sweep's path) against scipy's roots_genlaguerre, and exact
    for u^k, k < 2n, against Gamma(alpha + k + 1) (a rule of n points is exact to degree 2n - 1)."""
    from scipy.special import roots_genlaguerre

    x, w = _laguerre(n, alpha)
    xs, ws = roots_genlaguerre(n, alpha)
    np.testing.assert_allclose(x, xs, rtol=1e-13)
    np.testing.assert_allclose(w, ws, rtol=0, atol=1e-14 * ws.max())
    for k in range(min(2 * n, 12)):
        assert w @ x**k == pytest.approx(math.gamma(alpha + k + 1), rel=1e-13)


@pytest.mark.parametrize("q", QS)
def test_closed_forms(q):
    assert gaussian_mean("relu", q, "dphi2") == pytest.approx(0.5, abs=1e-12)  # ReLU chi = sigma_w^2 / 2, any q
    assert gaussian_mean("relu", q, "phi2") == pytest.approx(q / 2, rel=1e-12)
    assert gaussian_mean("identity", q, "dphi2") == pytest.approx(1.0, abs=1e-12)  # linear chi = sigma_w^2
    assert gaussian_mean("identity", q, "phi2") == pytest.approx(q, rel=1e-12)
    assert gaussian_mean("leaky_relu", q, "dphi2") == pytest.approx((1 + 0.01**2) / 2, abs=1e-12)
    assert gaussian_mean("prelu", q, "phi2") == pytest.approx(q * (1 + 0.25**2) / 2, rel=1e-12)


def test_tanh_small_q_chi_tends_to_sigma_w2():
    # tanh'(x)^2 = 1 - 2x^2 + O(x^4): E = 1 - 2q + O(q^2) -> 1 as q -> 0 (sigma_b = 0).
    for q in (1e-2, 1e-4, 1e-6):
        assert abs(gaussian_mean("tanh", q, "dphi2") - (1 - 2 * q)) < 10 * q * q


def test_selu_fixed_point():
    # SELU's constants make q = 1 a fixed point of the variance map at sigma_w^2 = 1 (Klambauer et al. 2017).
    assert gaussian_mean("selu", 1.0, "phi2") == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("activation", [*SMOOTH, *KINKED])
def test_quadrature_converged_to_1e8(activation):
    for q, which in itertools.product(np.logspace(-6, 4, 21), ("phi2", "dphi2")):
        got = gaussian_mean(activation, float(q), which)
        ref = _adaptive(activation, float(q), which)  # adaptive Gauss-Kronrod, split where the integrand bends
        assert abs(got - ref) <= 1e-8 * max(1.0, abs(ref)), (activation, q, which, got, ref)
        if q <= 1:  # typical q: the Gauss rule alone is converged here
            assert abs(got - _rule(activation, float(q), which, 200)) <= 1e-10


@pytest.mark.parametrize("init", [InitCfg(), InitCfg(name="xavier", scheme="xavier"),
                                  InitCfg(name="kaiming", scheme="kaiming"),
                                  InitCfg(name="n", scheme="normal", std=0.3), InitCfg(name="u", scheme="uniform", bound=0.2),
                                  InitCfg(name="k", scheme="kaiming", distribution="normal", mode="fan_out",
                                          nonlinearity="relu")])
def test_weight_variance_is_what_pytorch_draws(init):
    fan_in, fan_out = 300, 200
    torch.manual_seed(0)
    w, b = zip(*(new_linear(fan_in, fan_out, init) for _ in range(20)))
    sw2, sb2 = weight_variance(init, fan_in, fan_out)
    assert torch.stack(w).double().var().item() * fan_in == pytest.approx(sw2, rel=0.02)
    assert torch.stack(b).double().var().item() == pytest.approx(sb2, rel=0.1)


def test_no_prediction_is_said_not_guessed():
    assert "residual" in predict(make_cfg(model={"residual": True}), 1.0, 1, 1)
    assert "batchnorm" in predict(make_cfg(model={"norm": "batchnorm"}), 1.0, 1, 1)
    assert "non-zero mean" in predict(make_cfg(init={"name": "n", "scheme": "normal", "mean": 0.1}), 1.0, 1, 1)
    runs, _ = build_tables([make_cfg(model={"residual": True, "depth": 2}, train={"steps": 2})],
                           train_group([make_cfg(model={"residual": True, "depth": 2}, train={"steps": 2})]))
    assert np.isnan(runs["pred_grad_ratio_log10"][0]) and runs["pred_note"][0].startswith("no prediction")


INITS = {"xavier": {"name": "xavier", "scheme": "xavier"}, "kaiming": {"name": "kaiming", "scheme": "kaiming"},
         "default": {"name": "default", "scheme": "default"}}


@pytest.mark.slow
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_wide_nets_agree_with_the_prediction(activation):
    """Width 256 on data=gaussian with loss=projection, at initialisation, 3 seeds per configuration.

    Tolerance: each layer's measured factor |dL/dh_l|^2 / |dL/dh_l+1|^2 is a mean over `width` units whose
    squared terms have a relative spread of about sqrt(2) (sqrt(4) for ReLU, whose units are half off), so its
    log10 fluctuates by ~0.434 * sqrt(c / width) and half that for a norm; over `depth` independent layers the
    errors add like a random walk. On the median of 3 seeds: tol = 0.05 + 3 * 0.217 * sqrt(4 depth / width) / sqrt(3)
    (0.13 at depth 2, 0.24 at depth 10, 0.37 at depth 30); the 0.05 covers the finite-batch (100 points) terms.
    """
    width = 256
    for init, depth in itertools.product(INITS, (2, 10, 30)):
        cfgs = [make_cfg(model={"depth": depth, "width": width, "activation": activation}, init=INITS[init],
                         data={"name": "gaussian", "in_dim": width, "out_dim": width}, loss="projection",
                         train={"steps": 1, "seed": s}) for s in range(3)]
        runs, _ = build_tables(cfgs, train_group(cfgs))
        tol = 0.05 + 3 * 0.217 * math.sqrt(4 * depth / width) / math.sqrt(3)
        for meas, pred in (("grad_ratio_log10", "pred_grad_ratio_log10"), ("wgrad_ratio_log10", "pred_wgrad_ratio_log10")):
            assert abs(runs[meas].median() - runs[pred][0]) <= tol, (init, depth, meas, runs[meas].tolist(), runs[pred][0])
