"""Per-layer gradient statistics of stacked runs, computed on the device without a host sync.

Reductions run over the whole (R, P) gradient matrix at once, with segment sums keyed by the
parameter each column belongs to, so one step's statistics cost a few dozen tensor ops however
deep the network is. :meth:`StatsPlan.collect` returns a (R, n_layers, n_stats) tensor whose last
axis follows ``LAYER_STATS``.
"""

from __future__ import annotations

import torch

from gradsweep.model import RELU_FAMILY, SATURATING, Forward, Layer, ParamLayout

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


class StatsPlan:
    """Index tensors prepared once per group, so that each step's statistics are pure tensor ops."""

    def __init__(self, layout: ParamLayout, layers: list[Layer], activation: str, dtype: torch.dtype,
                 device: torch.device | str):
        # Each layer's output width: a Linear weight is (out, in), a norm gain is (width,).
        widths = [layout.shapes[layout.names.index(f"{la.name}.weight")][0] for la in layers]
        self.n_params = len(layout.names)
        self.seg = layout.segment_ids(device)
        self.w_idx = torch.tensor([layout.names.index(f"{la.name}.weight") for la in layers], device=device)
        self.w_numel = torch.tensor([float(torch.Size(layout.shapes[i]).numel()) for i in self.w_idx.tolist()],
                                    dtype=dtype, device=device)
        self.widths = torch.tensor([float(w) for w in widths], dtype=dtype, device=device)
        self.hidden_rows = torch.tensor([k for k, la in enumerate(layers) if la.kind == "linear"][:-1], device=device)
        self.n_layers = len(layers)
        self.activation = activation

    def _seg_sum(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], self.n_params, dtype=x.dtype, device=x.device).index_add_(1, self.seg, x)

    def weight_sq(self, flat: torch.Tensor) -> torch.Tensor:
        """(R, n_layers) squared norm of each layer's weight; taken before the update."""
        return self._seg_sum(flat * flat)[:, self.w_idx]

    def collect(self, fwd: Forward, out_grads: list[torch.Tensor], grad: torch.Tensor, weight_sq: torch.Tensor,
                update: torch.Tensor, updated: torch.Tensor) -> torch.Tensor:
        """One step's statistics, (R, n_layers, len(LAYER_STATS)).

        ``out_grads[k]`` is dL/d(output of layer k), L the run's mean loss; ``grad`` the unclipped (R, P)
        gradient; ``update`` the applied (R, P) update; ``updated`` (R,) whether the run was updated.
        """
        R, dt = grad.shape[0], grad.dtype
        nan = torch.full((R, self.n_layers), float("nan"), dtype=dt, device=grad.device)
        w = self.w_idx
        g2 = self._seg_sum(grad * grad)[:, w]
        gmax = torch.zeros(R, self.n_params, dtype=dt, device=grad.device).scatter_reduce_(
            1, self.seg.expand(R, -1), grad.abs(), "amax")[:, w]
        zeros = self._seg_sum((grad == 0).to(dt))[:, w]
        nonfinite = self._seg_sum((~torch.isfinite(grad)).to(dt))[:, w]
        u_norm = torch.sqrt(self._seg_sum(update * update)[:, w])
        w_norm = torch.sqrt(weight_sq)
        ratio = torch.where(updated.unsqueeze(1), u_norm / w_norm, nan)

        def norms(ts: list[torch.Tensor]) -> torch.Tensor:  # (R, len(ts)): each tensor's norm per run
            # One reduction per tensor over its contiguous inner dims: cheaper than concatenating them first.
            return torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1) for t in ts], dim=1)

        batch = fwd.out.shape[1]
        hgrad = norms(out_grads)
        out_rms = norms(fwd.outputs) / torch.sqrt(batch * self.widths)

        act_rms = saturated = dead = nan
        if fwd.acts:
            width = fwd.acts[0].shape[2]
            act_rms = nan.index_copy(1, self.hidden_rows, norms(fwd.acts) / (batch * width) ** 0.5)
            if self.activation in SATURATING:
                lo = -1.0 if self.activation == "tanh" else 0.0
                sat = [((a < lo + SATURATION_TOL) | (a > 1 - SATURATION_TOL)).flatten(1).to(dt).mean(dim=1)
                       for a in fwd.acts]
                saturated = nan.index_copy(1, self.hidden_rows, torch.stack(sat, dim=1))
            if self.activation in RELU_FAMILY:
                # A unit is dead when no sample of the batch puts it on the positive side.
                # Max over the batch of (R, B, W): transposed to make the batch the inner axis first,
                # which on the CPU is twice as fast as reducing the strided middle axis.
                off = [(h.transpose(1, 2).contiguous().amax(dim=2) <= 0).to(dt).mean(dim=1) for h in fwd.act_inputs]
                dead = nan.index_copy(1, self.hidden_rows, torch.stack(off, dim=1))
        return torch.stack([
            torch.sqrt(g2), torch.sqrt(g2 / self.w_numel), gmax, zeros / self.w_numel, nonfinite,
            hgrad, w_norm, ratio, out_rms, act_rms, saturated, dead,
        ], dim=2)
