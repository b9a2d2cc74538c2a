"""Mean-field predictions of signal propagation at initialisation, drawn beside every measurement.

For a plain MLP whose Linear layer l has weights of variance sigma_w,l^2 / fan_in and biases of variance
sigma_b,l^2 (both derived from the run's init scheme, PyTorch's default Linear init included), mean-field
theory (Poole et al. 2016; Schoenholz et al. 2017, "Deep Information Propagation"; He et al. 2015 sec. 2.2;
Glorot & Bengio 2010 eqs. 13-14) gives, in the wide limit,

    q_1 = sigma_w,1^2 q_in + sigma_b,1^2,   q_in = the input's mean squared entry,
    q_l = sigma_w,l^2 E[phi(sqrt(q_{l-1}) z)^2] + sigma_b,l^2,                 z ~ N(0, 1),
    chi_l = sigma_w,l+1^2 E[phi'(sqrt(q_l) z)^2]    (|dL/dh_l|^2 = chi_l |dL/dh_{l+1}|^2),

so the backpropagated signal's log10 ratio between the first Linear layer and the readout is
0.5 sum_l log10 chi_l, and the weight gradients' ratio adds the forward factor
0.5 log10(|x|^2 / |a_depth|^2) (dL/dW_l = dL/dh_l a_{l-1}^T: forward and backward factors partly cancel).
Under ``loss=projection`` (dL/df = g/B with fixed random g) the gradient-independence assumption holds and
wide nets agree with these numbers; residual and normalised nets get no prediction (``pred_note`` says so).

Expectations are Gauss-Hermite quadratures for smooth activations; for those with a kink at 0 (the ReLU
family) each half-line is integrated separately with generalised Gauss-Laguerre rules (the half-range
analogue), so that both converge exponentially instead of slowly across the kink.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gradsweep.config.sections import PRELU_INIT, InitCfg, RunCfg, linear_dims

QUAD_POINTS = 100  # and 200 to check convergence (numpy's hermgauss stays accurate to ~300)
SMOOTH_Q_MAX = 16.0  # sqrt(q) <= 4: the Gauss-Hermite rule resolves phi(sqrt(q) z) (checked in tests/test_theory.py)
SELU_LAMBDA, SELU_ALPHA = 1.0507009873554805, 1.6732632423543772
LEAKY_SLOPE, PRELU_SLOPE = 0.01, PRELU_INIT  # F.leaky_relu's default; nn.PReLU's initial slope

Fn = Callable[[np.ndarray], np.ndarray]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(x / 2))


def _gelu(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def _gelu_prime(x: np.ndarray) -> np.ndarray:
    from scipy.special import erf

    return 0.5 * (1 + erf(x / math.sqrt(2))) + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)


# Smooth activations: (phi, phi').
SMOOTH: dict[str, tuple[Fn, Fn]] = {
    "identity": (lambda x: x, lambda x: np.ones_like(x)),
    "tanh": (np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "sigmoid": (_sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x))),
    "gelu": (_gelu, _gelu_prime),
}
# Activations analytic on each side of 0: (phi on x > 0, phi on x < 0, phi' on x > 0, phi' on x < 0).
KINKED: dict[str, tuple[Fn, Fn, Fn, Fn]] = {
    "relu": (lambda x: x, np.zeros_like, np.ones_like, np.zeros_like),
    "leaky_relu": (lambda x: x, lambda x: LEAKY_SLOPE * x, np.ones_like, lambda x: np.full_like(x, LEAKY_SLOPE)),
    "prelu": (lambda x: x, lambda x: PRELU_SLOPE * x, np.ones_like, lambda x: np.full_like(x, PRELU_SLOPE)),
    "elu": (lambda x: x, np.expm1, np.ones_like, np.exp),
    "selu": (lambda x: SELU_LAMBDA * x, lambda x: SELU_LAMBDA * SELU_ALPHA * np.expm1(x),
             lambda x: np.full_like(x, SELU_LAMBDA), lambda x: SELU_LAMBDA * SELU_ALPHA * np.exp(x)),
}


@functools.cache
def _hermite(n: int) -> tuple[np.ndarray, np.ndarray]:
    x, w = np.polynomial.hermite.hermgauss(n)
    return x * math.sqrt(2), w / math.sqrt(math.pi)  # E[f(z)] = sum w_i f(x_i), z ~ N(0, 1)


def _genlaguerre(n: int, alpha: float, x: np.ndarray) -> np.ndarray:
    """L_n^alpha(x), by the normalised recurrence scipy's ``eval_genlaguerre`` uses (stable where the plain
    three-term one loses digits) times binom(n + alpha, n) as a product."""
    if n == 0:
        return np.ones_like(x)
    d = -x / (alpha + 1)
    p = d + 1
    for k in range(1, n):
        d = -x / (k + alpha + 1) * p + (k / (k + alpha + 1)) * d
        p = d + p
    return math.prod((k + alpha) / k for k in range(1, n + 1)) * p


@functools.cache
def _laguerre(n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """The n-point generalised Gauss-Laguerre rule: int_0^inf u^alpha e^-u f(u) du = sum w_i f(u_i).

    Golub-Welsch (the eigenvalues of the Jacobi matrix), one Newton step on L_n^alpha, weights from
    1 / (L_(n-1)^alpha(u_i) L_n^alpha'(u_i)) log-normalised against overflow: scipy's ``roots_genlaguerre``
    step for step (checked against it in tests/test_theory.py), without importing scipy.special (~0.5 s).
    """
    k = np.arange(n, dtype=np.float64)
    off = np.sqrt(k[1:] * (k[1:] + alpha))
    x = np.linalg.eigvalsh(np.diag(2 * k + alpha + 1) + np.diag(off, 1) + np.diag(off, -1))
    dy = (n * _genlaguerre(n, alpha, x) - (n + alpha) * _genlaguerre(n - 1, alpha, x)) / x
    x = x - _genlaguerre(n, alpha, x) / dy
    fm = _genlaguerre(n - 1, alpha, x)
    log_fm, log_dy = np.log(np.abs(fm)), np.log(np.abs(dy))
    w = 1.0 / ((fm / np.exp((log_fm.max() + log_fm.min()) / 2)) * (dy / np.exp((log_dy.max() + log_dy.min()) / 2)))
    return x, w * (math.gamma(alpha + 1) / w.sum())


def _half_line(h: Fn, n: int) -> float:
    """int_0^inf h(z) phi(z) dz for h analytic near [0, inf), phi the standard normal density.

    With z = sqrt(2u): (1 / (2 sqrt(pi))) int_0^inf u^(-1/2) e^(-u) h(sqrt(2u)) du; h's even part is analytic in u
    (Laguerre weight u^(-1/2)) and its odd part is sqrt(u) times a function analytic in u (weight u^0).
    """
    ue, we = _laguerre(n, -0.5)
    uo, wo = _laguerre(n, 0.0)
    se, so = np.sqrt(2 * ue), np.sqrt(2 * uo)
    even = (h(se) + h(-se)) / 2
    odd = (h(so) - h(-so)) / (2 * np.sqrt(uo))
    return float((we @ even + wo @ odd) / (2 * math.sqrt(math.pi)))


def _rule(activation: str, q: float, which: str, n: int) -> float:
    s = math.sqrt(max(q, 0.0))
    if activation in SMOOTH:
        f = SMOOTH[activation][0 if which == "phi2" else 1]
        x, w = _hermite(n)
        return float(w @ f(s * x) ** 2)
    pos, neg, dpos, dneg = KINKED[activation]
    fp, fn = (pos, neg) if which == "phi2" else (dpos, dneg)
    return _half_line(lambda z: fp(s * z) ** 2, n) + _half_line(lambda z: fn(-s * z) ** 2, n)


def _adaptive(activation: str, q: float, which: str) -> float:
    """Adaptive Gauss-Kronrod with breakpoints where the integrand changes on the scale 1/sqrt(q)."""
    from scipy.integrate import quad

    s = math.sqrt(max(q, 0.0))
    if activation in SMOOTH:
        f = SMOOTH[activation][0 if which == "phi2" else 1]
    else:
        pos, neg, dpos, dneg = KINKED[activation]
        fp, fn = (pos, neg) if which == "phi2" else (dpos, dneg)
        f = lambda x: np.where(x > 0, fp(np.abs(x)), fn(-np.abs(x)))  # noqa: E731
    g = lambda z: float(f(np.array(s * z)) ** 2) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    edges = sorted({0.0, *(k / s for k in (1, 3, 10) if s > 0.1), *(-k / s for k in (1, 3, 10) if s > 0.1)})
    edges = [e for e in edges if -12 < e < 12]
    pieces = [-12.0, *edges, 12.0]
    return sum(quad(g, a, b, epsabs=1e-15, epsrel=1e-13, limit=200)[0] for a, b in zip(pieces[:-1], pieces[1:]))


@functools.lru_cache(maxsize=65536)
def gaussian_mean(activation: str, q: float, which: str) -> float:
    """E[phi(sqrt(q) z)^2] (which='phi2') or E[phi'(sqrt(q) z)^2] (which='dphi2'), z ~ N(0, 1).

    The Gauss rule at QUAD_POINTS and at 2 x QUAD_POINTS must agree to 1e-11, else adaptive quadrature takes
    over; so does it for smooth activations beyond q = SMOOTH_Q_MAX, where the integrand narrows to a width
    1/sqrt(q) that a fixed rule in z misses while two rules still agree (tanh'^2 at q = 1e4: both give ~0).
    """
    if activation in SMOOTH and q > SMOOTH_Q_MAX:
        return _adaptive(activation, q, which)
    with np.errstate(over="ignore", invalid="ignore"):
        a, b = _rule(activation, q, which, QUAD_POINTS), _rule(activation, q, which, 2 * QUAD_POINTS)
    if math.isfinite(a) and abs(a - b) <= 1e-11 * max(1.0, abs(b)):
        return b
    return _adaptive(activation, q, which)


def _gain(nonlinearity: str, a: float) -> float:
    import torch.nn as nn

    return nn.init.calculate_gain(nonlinearity, a if nonlinearity == "leaky_relu" else None)


def weight_variance(init: InitCfg, fan_in: int, fan_out: int) -> tuple[float, float] | str:
    """(sigma_w^2, sigma_b^2): Var(W_ij) = sigma_w^2 / fan_in and Var(b_i) = sigma_b^2 for one Linear layer under
    ``init`` (the bias as PyTorch draws it unless ``init.bias`` sets it); a string says why there is none."""
    s = init.scheme
    if s == "default":  # kaiming_uniform_(a=sqrt(5)): bound = sqrt(6 / ((1 + 5) fan_in)) = 1 / sqrt(fan_in)
        var = 1.0 / (3 * fan_in)
    elif s == "xavier":
        var = init.gain**2 * 2.0 / (fan_in + fan_out)
    elif s == "kaiming":
        var = _gain(init.nonlinearity, init.a) ** 2 / (fan_in if init.mode == "fan_in" else fan_out)
    elif s == "normal":
        if init.mean != 0:
            return "no prediction: weights with a non-zero mean (init.mean)"
        var = init.std**2
    elif s == "uniform":
        var = init.bound**2 / 3
    elif s == "orthogonal":  # orthonormal rows (or columns): entries of variance gain^2 / max(fan_in, fan_out)
        var = init.gain**2 / max(fan_in, fan_out)
    else:
        return f"no prediction: init.scheme={s}"
    if init.bias is None:
        bias_var = 1.0 / (3 * fan_in)  # nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    elif init.bias == 0:
        bias_var = 0.0
    else:
        return "no prediction: constant non-zero biases (init.bias)"
    return var * fan_in, bias_var


@dataclass(frozen=True)
class Prediction:
    """Mean-field predictions for one configuration at initialisation."""

    grad_ratio_log10: float
    """log10 |dL/dh_1| / |dL/dh_readout|."""
    wgrad_ratio_log10: float
    """log10 |dL/dW_1| / |dL/dW_readout|."""
    chi: tuple[float, ...]
    """chi_l for the hidden blocks l = 1..depth."""
    q: tuple[float, ...]
    """q_l, the pre-activation variance of hidden block l."""


def predict(cfg: RunCfg, q_in: float, in_dim: int, out_dim: int) -> Prediction | str:
    """The run's predictions, or a string saying why theory makes none for it."""
    m = cfg.model
    if m.name != "mlp":
        return f"{m.name} model: no mean-field prediction"
    if m.residual:
        return "no prediction: residual connections (the plain-MLP recursion does not apply)"
    if m.norm != "none":
        return f"no prediction: model.norm={m.norm} (the plain-MLP recursion does not apply)"
    sw, sb = [], []
    for fan_in, fan_out in linear_dims(m, in_dim, out_dim):
        v = weight_variance(cfg.init, fan_in, fan_out)
        if isinstance(v, str):
            return v
        sw.append(v[0])
        sb.append(v[1])
    q = [sw[0] * q_in + sb[0]]
    for layer in range(1, m.depth):
        q.append(sw[layer] * gaussian_mean(m.activation, q[-1], "phi2") + sb[layer])
    chi = [sw[layer + 1] * gaussian_mean(m.activation, q[layer], "dphi2") for layer in range(m.depth)]
    with np.errstate(divide="ignore"):
        ratio = 0.5 * float(np.sum(np.log10(chi)))
        act2 = m.width * gaussian_mean(m.activation, q[-1], "phi2")  # |a_depth|^2 per sample
        wratio = ratio + 0.5 * float(np.log10(in_dim * q_in / act2)) if act2 > 0 else math.inf
    return Prediction(ratio, wratio, tuple(chi), tuple(q))
