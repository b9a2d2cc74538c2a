"""The learning-rate edge a run's sharpness predicts, and the phase of gradient descent its loss curve shows.

Gradient descent on a quadratic with top Hessian eigenvalue lambda is stable iff lr < 2 / lambda; heavy-ball
momentum beta moves the bound to 2 (1 + beta) / lambda, and weight decay wd adds wd to every eigenvalue. On a net,
2 / lambda_0 (at initialisation) is where the catapult phase begins, not where divergence does (Lewkowycz et al.
2020): between it and a few times it the loss first rises, the sharpness drops, and the run converges.
"""

from __future__ import annotations

import numpy as np

PHASES = ("monotone", "catapult", "diverged", "not_full_batch")
"""monotone: the loss never rose above its initial value; catapult: it rose above it, then ended below it;
diverged: non-finite, or ended above its initial value after rising; not_full_batch: minibatches, whose noise the
three phases of full-batch gradient descent do not describe."""
CATAPULT_RISE = 0.01
"""A rise counts once the loss exceeds its initial value by this, relative: a spike a person sees on the curve,
not the rounding of a flat one."""


def lr_edge(optim, sharpness: float) -> tuple[float, str | None]:
    """(lr_edge_pred, lr_edge_note) for a run with optimiser config ``optim`` (gradsweep.config.sections.OptimCfg)
    and sharpness at initialisation ``sharpness``: NaN and why where there is no prediction."""
    if optim.name == "adam":
        return float("nan"), ("adam: no prediction; its edge is on the preconditioned Hessian, which is not measured "
                              "(Cohen et al. 2022)")
    if not np.isfinite(sharpness):
        return float("nan"), "no sharpness at step 0 (a non-finite loss, no second derivative, or not measured)"
    curvature = sharpness + optim.weight_decay  # the decay's quadratic wd/2 |w|^2 adds wd to every eigenvalue
    if curvature <= 0:
        return float("nan"), "no positive curvature at step 0: gradient descent has no edge from it"
    return 2 * (1 + optim.momentum) / curvature, None


def phases(loss: np.ndarray, valid: np.ndarray, final_loss: np.ndarray, diverged: np.ndarray,
           full_batch: np.ndarray) -> np.ndarray:
    """Each run's phase (one of PHASES) from its (T, R) logged losses (``valid``: the steps before it diverged),
    its final loss, whether it diverged, and whether it trained full batch."""
    initial = loss[0]
    with np.errstate(invalid="ignore"):
        peak = np.where(valid & np.isfinite(loss), loss, -np.inf).max(axis=0)
        rose = peak > initial * (1 + CATAPULT_RISE)
        unsettled = rose & ~(final_loss < initial)
    out = np.where(rose, "catapult", "monotone").astype(object)
    out[diverged | unsettled | ~np.isfinite(initial)] = "diverged"
    out[~full_batch] = "not_full_batch"
    return out
