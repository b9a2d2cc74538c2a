"""Losses of stacked runs, one value per run, with PyTorch's reductions (``F.mse_loss``, ``F.cross_entropy``)."""

from __future__ import annotations

import torch

from gradsweep.config.sections import LOSSES

LOSS_NAMES = tuple(name for name in LOSSES if name != "auto")  # what a run computes: "auto" is resolved before


def per_run_loss(name: str, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(R,) loss of each run from its outputs (R, B, out) and targets.

    mse: mean over batch and outputs of (out - y)^2, as ``F.mse_loss``; cross_entropy: targets (R, B) class
    indices, mean over the batch, as ``F.cross_entropy``; projection: mean over the batch of g_b . f(x_b) with
    the data's fixed targets g (R, B, out): linear in the output, so dL/df = g / B whatever the network does.
    """
    if name == "mse":
        return (out - target).square().mean(dim=(1, 2))
    if name == "cross_entropy":
        return -torch.log_softmax(out, dim=-1).gather(-1, target.unsqueeze(-1)).mean(dim=(1, 2))
    if name == "projection":
        return (out * target).sum(dim=-1).mean(dim=1)
    raise ValueError(f"loss={name!r} is not valid; valid values: {', '.join(LOSS_NAMES)}")


def baseline_loss(name: str, target: torch.Tensor) -> float:
    """The loss of the trivial predictor on ``target`` (the training set), in float64: the bar a run must beat
    to have learned anything.

    mse: predicting the training mean, i.e. the targets' variance (ddof 0) averaged over outputs;
    cross_entropy: predicting the class prior, i.e. its entropy; projection: none (NaN; that loss has no floor).
    """
    if name == "mse":
        y = target.double()
        return float((y - y.mean(dim=0)).square().mean())
    if name == "cross_entropy":
        p = torch.bincount(target.flatten()).double()
        p = p[p > 0] / p.sum()
        return float(-(p * p.log()).sum())
    if name == "projection":
        return float("nan")
    raise ValueError(f"loss={name!r} is not valid; valid values: {', '.join(LOSS_NAMES)}")


def per_run_accuracy(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(R,) fraction of the batch whose largest output is the target class."""
    return (out.argmax(dim=-1) == target).to(out.dtype).mean(dim=1)
