"""Per-layer gradient statistics of stacked runs, computed on the device without a host sync.

Reductions run over the whole (R, P) gradient matrix at once, through strided views that cover
every equally sized weight together, so one step's statistics cost a few dozen tensor ops however
deep the network is. :meth:`StatsPlan.collect` returns a (R, n_layers, n_stats) tensor whose last
axis follows ``LAYER_STATS``.

Gradient and update norms do not underflow: in float32 the square of an entry below ~1e-23 is 0, so a plain
sum of squares reads "no signal" for a gradient of 1e-21 that is really there (a deep sigmoid net's first
layers). Each such norm is also summed over entries scaled by a power of two, and that sum is used where the
plain one is too small to be exact (:func:`small_scale`). A norm recorded as 0 means every entry is exactly 0.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from gradsweep.model import RELU_FAMILY, SATURATING, Layer, ParamLayout

SATURATION_TOL = 1e-2  # a sigmoid/tanh unit within this of its bounds counts as saturated


@dataclass(frozen=True)
class _Run:
    """Weights of equal size at evenly spaced flat offsets: one strided view reduces them all at once."""

    rows: tuple[int, ...]
    """Their rows in ``layers`` order."""
    offset: int
    stride: int
    numel: int


def _evenly_spaced(spans: list[tuple[int, int, int]]) -> list[_Run]:
    """Split (row, offset, numel) spans into maximal runs of equal numel and constant offset step."""
    runs: list[_Run] = []
    for numel in sorted({n for _, _, n in spans}):
        todo = sorted((o, r) for r, o, n in spans if n == numel)
        while todo:
            (o0, r0), rest = todo[0], todo[1:]
            rows, step = [r0], (rest[0][0] - o0 if rest else numel)
            for o, r in rest:
                if o - o0 != step * len(rows):
                    break
                rows.append(r)
            todo = todo[len(rows):]
            runs.append(_Run(tuple(rows), o0, step, numel))
    return runs


class StatsPlan:
    """Views and index tensors prepared once per group, so that each step's statistics are a few tensor ops.

    The per-weight reductions (squared norms, max, zero and non-finite counts) never gather or scatter:
    the elementwise terms are computed once over the whole (R, P) matrix, and each set of equally sized,
    evenly spaced weights (the hidden layers of an MLP) is reduced through one strided view.
    """

    # grad^2, (grad * scale)^2, [grad != 0], [grad non-finite], update^2, (update * scale)^2, weight^2
    N_TERMS = 7

    def __init__(self, layout: ParamLayout, layers: list[Layer], activation: str, dtype: torch.dtype,
                 device: torch.device | str):
        # Each layer's output width: a Linear weight is (out, in), a norm gain is (width,).
        w_names = [f"{la.name}.weight" for la in layers]
        shapes = [layout.shapes[layout.names.index(n)] for n in w_names]
        spans = [(k, layout.offsets[layout.names.index(n)], math.prod(s)) for k, (n, s) in enumerate(zip(w_names, shapes))]
        self.runs = _evenly_spaced(spans)
        order = [r for run in self.runs for r in run.rows]
        self.unpermute = torch.tensor([order.index(k) for k in range(len(layers))], device=device)
        self.P = layout.size
        self.w_numel = torch.tensor([float(n) for _, _, n in spans], dtype=dtype, device=device)
        self.widths = torch.tensor([float(s[0]) for s in shapes], dtype=dtype, device=device)
        self.hidden_rows = torch.tensor([k for k, la in enumerate(layers) if la.kind == "linear"][:-1], device=device)
        self.n_layers = len(layers)
        self.activation = activation
        self.dtype, self.device = dtype, device
        self.small, self.scale = small_scale(dtype)
        self._terms: torch.Tensor | None = None

    def _buffer(self, R: int) -> torch.Tensor:
        if self._terms is None or self._terms.shape[1] != R:
            self._terms = torch.empty(self.N_TERMS, R, self.P, dtype=self.dtype, device=self.device)
        return self._terms

    def _per_weight(self, x: torch.Tensor, reduce) -> torch.Tensor:
        """Reduce (..., R, P) over each weight's columns: (..., R, n_layers) in ``layers`` order."""
        lead, (R, P) = x.shape[:-2], x.shape[-2:]
        lead_strides = x.stride()[:-2]
        parts = [reduce(x.as_strided((*lead, R, len(run.rows), run.numel), (*lead_strides, P, run.stride, 1),
                                     x.storage_offset() + run.offset), -1) for run in self.runs]
        return torch.cat(parts, dim=-1).index_select(-1, self.unpermute)

    def weight_sq(self, flat: torch.Tensor) -> None:
        """Record each layer's weight before this step's update (call before the optimiser step)."""
        terms = self._buffer(flat.shape[0])
        torch.mul(flat, flat, out=terms[6])

    def start(self) -> None:
        """Begin a logged step: pass :meth:`probe` to this step's forward pass, before its backward pass."""
        self._hgrad: list[torch.Tensor | None] = []
        self._out_norm: list[torch.Tensor] = []
        self._act_norm: list[torch.Tensor] = []
        self._sat: list[torch.Tensor] = []
        self._pos_sum: list[torch.Tensor] = []

    def probe(self, outputs: list[torch.Tensor], act_input: torch.Tensor | None, act: torch.Tensor | None) -> None:
        """Take one block's forward-side statistics as the forward pass computes it (the tensors still in cache),
        and hook its outputs so that their gradients are reduced the moment autograd forms them, instead of
        being kept alive to the end of the step (which costs large groups more than the reductions do)."""
        self._batch = outputs[0].shape[1]
        for h in outputs:
            h.register_hook(functools.partial(self._record_hgrad, len(self._hgrad)))
            self._hgrad.append(None)
            self._out_norm.append(torch.linalg.vector_norm(h.flatten(1), dim=1))
        if act is None:
            return
        self._width = act.shape[2]
        self._act_norm.append(torch.linalg.vector_norm(act.flatten(1), dim=1))
        if self.activation in SATURATING:
            lo = -1.0 if self.activation == "tanh" else 0.0
            self._sat.append(((act < lo + SATURATION_TOL) | (act > 1 - SATURATION_TOL)).flatten(1).to(act.dtype).mean(dim=1))
        if self.activation in RELU_FAMILY:
            # A unit is dead when no sample of the batch puts it on the positive side: the sum over the batch
            # of max(h, 0) is 0 (a sum over the middle axis is several times cheaper than a max). For ReLU
            # that is the activation's own output.
            self._pos_sum.append((act if self.activation == "relu" else act_input.clamp_min(0)).sum(dim=1))

    def _record_hgrad(self, k: int, grad: torch.Tensor) -> None:
        flat = grad.flatten(1)
        self._hgrad[k] = self._norm(torch.linalg.vector_norm(flat, dim=1),
                                    torch.linalg.vector_norm(flat * self.scale, dim=1))

    def collect(self, grad: torch.Tensor, update: torch.Tensor, updated: torch.Tensor) -> torch.Tensor:
        """One step's statistics, (R, n_layers, len(LAYER_STATS)).

        ``grad`` is the unclipped (R, P) gradient of the runs' mean losses; ``update`` the applied (R, P)
        update; ``updated`` (R,) whether the run was updated. :meth:`start` and :meth:`probe` must have seen
        this step's forward pass, and :meth:`weight_sq` the parameters before the update.
        """
        R, dt = grad.shape[0], grad.dtype
        nan = torch.full((R, self.n_layers), float("nan"), dtype=dt, device=grad.device)
        terms = self._buffer(R)
        # Float arithmetic only: comparisons that produce bool tensors cost several times more on the CPU.
        absg = grad.abs()
        torch.mul(grad, grad, out=terms[0])
        torch.mul(absg, self.scale, out=terms[1]).square_()
        torch.clamp(absg, max=1.0, out=terms[2]).ceil_().nan_to_num_(nan=1.0)  # 1 where grad != 0 (NaN too), else 0
        torch.mul(absg, 0.0, out=terms[3]).nan_to_num_(nan=1.0)  # inf * 0 and NaN * 0 are NaN: 1, else 0
        torch.mul(update, update, out=terms[4])
        torch.mul(update, self.scale, out=terms[5]).square_()
        sums = self._per_weight(terms, torch.sum)  # (7, R, L)
        g2, g2_scaled, nonzero, nonfinite, u2, u2_scaled, w2 = sums.unbind(0)
        g_norm = self._norm(torch.sqrt(g2), torch.sqrt(g2_scaled))
        u_norm = self._norm(torch.sqrt(u2), torch.sqrt(u2_scaled))
        gmax = self._per_weight(absg, torch.amax)
        w_norm = torch.sqrt(w2)
        ratio = torch.where(updated.unsqueeze(1), u_norm / w_norm, nan)
        hgrad = torch.stack(self._hgrad, dim=1)
        batch = self._batch
        out_rms = torch.stack(self._out_norm, dim=1) / torch.sqrt(batch * self.widths)
        act_rms = saturated = dead = nan
        if self._act_norm:
            act_rms = nan.index_copy(1, self.hidden_rows, torch.stack(self._act_norm, dim=1) / (batch * self._width) ** 0.5)
        if self._sat:
            saturated = nan.index_copy(1, self.hidden_rows, torch.stack(self._sat, dim=1))
        if self._pos_sum:
            off = torch.stack(self._pos_sum, dim=1) == 0  # (R, blocks, W)
            dead = nan.index_copy(1, self.hidden_rows, off.to(dt).mean(dim=2))
        return torch.stack([
            g_norm, g_norm / torch.sqrt(self.w_numel), gmax, (self.w_numel - nonzero) / self.w_numel, nonfinite,
            hgrad, w_norm, ratio, out_rms, act_rms, saturated, dead,
        ], dim=2)


    def _norm(self, plain: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        """A norm from the plain one and the one of the entries times ``self.scale``: the plain one unless it is
        too small to be exact (below ``self.small``)."""
        return torch.where(plain >= self.small, plain, scaled / self.scale)


def small_scale(dtype: torch.dtype) -> tuple[float, float]:
    """(small, scale): a norm below ``small`` is taken from entries multiplied by ``scale``, a power of two.

    Below ``small`` (2^-50 in float32) every entry is below it too, so the scaled entries (at most 2^40) square
    without overflow, and an entry as small as the dtype's least subnormal squares to a normal number; above
    it, the squares that underflow are too small to change the sum. float64: 2^-100 and 2^600, likewise.
    """
    if dtype == torch.float64:
        return 2.0**-100, 2.0**600
    return 2.0**-50, 2.0**90
