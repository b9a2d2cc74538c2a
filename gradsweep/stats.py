"""Per-layer gradient statistics of stacked runs, computed on the device without a host sync.

Every function returns tensors with a leading run axis; :func:`layer_stats` stacks one step's
statistics into a (R, n_layers, n_stats) tensor whose last axis follows ``LAYER_STATS``.
"""

from __future__ import annotations

import torch

from gradsweep.model import RELU_FAMILY, SATURATING, Forward, Layer

SATURATION_TOL = 1e-2  # a sigmoid/tanh unit within this of its bounds counts as saturated

LAYER_STATS = (
    "wgrad_norm",  # L2 norm of dL/dW (the layer's weight gradient, before clipping)
    "wgrad_rms",  # that norm / sqrt(number of entries)
    "wgrad_max",  # max |dL/dW|
    "wgrad_zero_frac",  # fraction of entries of dL/dW exactly 0
    "wgrad_nonfinite",  # count of NaN/Inf entries of dL/dW
    "hgrad_norm",  # L2 norm over the batch of dL/dh, h = the layer's output (pre-activation): the backpropagated signal
    "weight_norm",  # L2 norm of W before this step's update
    "update_ratio",  # |applied update of W| / |W| (after clipping, momentum, weight decay); NaN if no update
    "out_rms",  # RMS of the layer's output h over batch and units
    "act_rms",  # RMS of the block's activation output (hidden Linear rows only)
    "saturated_frac",  # sigmoid/tanh: fraction of (sample, unit) activations within 1e-2 of their bounds
    "dead_frac",  # ReLU family: fraction of units whose activation input is <= 0 for every sample
)


def _rms(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x.flatten(1).square().mean(dim=1))


def _norm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x.flatten(1), dim=1)


def _saturated(act: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "sigmoid":
        sat = (act < SATURATION_TOL) | (act > 1 - SATURATION_TOL)
    else:
        sat = act.abs() > 1 - SATURATION_TOL
    return sat.flatten(1).to(act.dtype).mean(dim=1)


def _dead(act_input: torch.Tensor) -> torch.Tensor:
    # (R, B, W): a unit is dead when no sample of the batch puts it on the positive side.
    return (act_input <= 0).all(dim=1).to(act_input.dtype).mean(dim=1)


def weight_names(layers: list[Layer]) -> list[str]:
    """The parameter holding each layer's weight (norm layers: their gain)."""
    return [f"{layer.name}.weight" for layer in layers]


def layer_stats(
    layers: list[Layer],
    activation: str,
    fwd: Forward,
    out_grads: list[torch.Tensor],
    weight_grads: list[torch.Tensor],
    weight_norms: torch.Tensor,
    update_norms: torch.Tensor,
) -> torch.Tensor:
    """One step's statistics, (R, len(layers), len(LAYER_STATS)).

    ``out_grads[k]`` is dL/d(output of layer k) with L the run's mean loss; ``weight_grads[k]`` is the
    unclipped gradient of its weight; ``weight_norms`` and ``update_norms`` are (R, len(layers)).
    """
    ref = fwd.out
    nan = torch.full((ref.shape[0],), float("nan"), dtype=ref.dtype, device=ref.device)
    rows = []
    for k, layer in enumerate(layers):
        g = weight_grads[k].flatten(1)
        gnorm = _norm(g)
        block_act = layer.kind == "linear" and layer.index <= len(fwd.acts)
        if block_act:
            i = layer.index - 1
            act_rms = _rms(fwd.acts[i])
            saturated = _saturated(fwd.acts[i], activation) if activation in SATURATING else nan
            dead = _dead(fwd.act_inputs[i]) if activation in RELU_FAMILY else nan
        else:
            act_rms = saturated = dead = nan
        rows.append(torch.stack([
            gnorm,
            gnorm / g.shape[1] ** 0.5,
            g.abs().amax(dim=1),
            (g == 0).to(g.dtype).mean(dim=1),
            (~torch.isfinite(g)).sum(dim=1).to(g.dtype),
            _norm(out_grads[k]),
            weight_norms[:, k],
            update_norms[:, k] / weight_norms[:, k],
            _rms(fwd.outputs[k]),
            act_rms,
            saturated,
            dead,
        ], dim=1))
    return torch.stack(rows, dim=1)


def norms_of(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-run L2 norms of a list of (R, ...) tensors, as (R, len(tensors))."""
    return torch.stack([_norm(t) for t in tensors], dim=1)
