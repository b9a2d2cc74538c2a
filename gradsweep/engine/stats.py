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

from gradsweep.engine.mlp import RELU_FAMILY, SATURATING, Layer, ParamMap

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

    def __init__(self, layout: ParamMap, layers: list[Layer], activation: str, dtype: torch.dtype,
                 device: torch.device | str, widths: list[int] | None = None):
        """``widths``: each layer's output entries per sample, where they are not its weight's first dimension (a
        Linear weight is (out, in), a norm gain (width,); a module's conv or norm layer: gradsweep.engine.nets)."""
        w_names = [la.weight_name for la in layers]
        shapes = [layout.shapes[layout.names.index(n)] for n in w_names]
        spans = [(k, layout.offsets[layout.names.index(n)], math.prod(s)) for k, (n, s) in enumerate(zip(w_names, shapes))]
        self.offsets, self.numels = [o for _, o, _ in spans], [n for _, _, n in spans]
        self.runs = _evenly_spaced(spans)
        order = [r for run in self.runs for r in run.rows]
        self.unpermute = torch.tensor([order.index(k) for k in range(len(layers))], device=device)
        self.P = layout.size
        self.w_numel = torch.tensor([float(n) for _, _, n in spans], dtype=dtype, device=device)
        self.widths = torch.tensor([float(s[0]) for s in shapes] if widths is None else [float(w) for w in widths],
                                   dtype=dtype, device=device)
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
            self._out_norm.append(out_norm(h))
        if act is None:
            return
        self._width = act.shape[2]
        act_norm, sat, pos_sum = block_terms(self.activation, act, act_input)
        self._act_norm.append(act_norm)
        if sat is not None:
            self._sat.append(sat)
        if pos_sum is not None:
            self._pos_sum.append(pos_sum)

    def _record_hgrad(self, k: int, grad: torch.Tensor) -> None:
        self._hgrad[k] = self.safe_norm(grad)

    def collect(self, grad: torch.Tensor, update: torch.Tensor, updated: torch.Tensor) -> torch.Tensor:
        """One step's statistics, (R, n_layers, len(LAYER_STATS)).

        ``grad`` is the unclipped (R, P) gradient of the runs' mean losses; ``update`` the applied (R, P)
        update; ``updated`` (R,) whether the run was updated. :meth:`start` and :meth:`probe` must have seen
        this step's forward pass, and :meth:`weight_sq` the parameters before the update.
        """
        stack = functools.partial(torch.stack, dim=1)
        return self.reduce(
            grad, update, updated, stack(self._hgrad), stack(self._out_norm), self._batch,
            stack(self._act_norm) if self._act_norm else None, self._width if self._act_norm else 0,
            stack(self._sat) if self._sat else None, stack(self._pos_sum) if self._pos_sum else None)

    def reduce(self, grad: torch.Tensor, update: torch.Tensor, updated: torch.Tensor, hgrad: torch.Tensor,
               out_norm: torch.Tensor, batch: int, act_norm: torch.Tensor | None = None, width: int = 0,
               saturated: torch.Tensor | None = None, pos_sum: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`collect` from the forward and backward side's reductions, taken by the caller (see :meth:`finish`):
        the per-weight ones of ``grad`` and ``update`` are taken here."""
        terms = self._buffer(grad.shape[0])
        absg, _ = self.terms(grad, update, out=terms)
        return self.finish(self.per_weight(terms, torch.sum), self.per_weight(absg, torch.amax), updated, hgrad,
                           out_norm, batch, act_norm, width, saturated, pos_sum)

    def terms(self, grad: torch.Tensor, update: torch.Tensor, out: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``|grad|`` (whose per-weight maximum is taken apart) and the first six elementwise terms that
        :meth:`per_weight` sums (see ``N_TERMS``), written into ``out[:6]`` when given (the eager engine's buffer,
        whose ``out[6]`` holds the squared weights), else new tensors (the compiled engine's, fused away)."""
        o = out if out is not None else [None] * 6
        # Float arithmetic only: comparisons that produce bool tensors cost several times more on the CPU.
        absg = grad.abs()
        return absg, [
            torch.mul(grad, grad, out=o[0]),
            torch.mul(absg, self.scale, out=o[1]).square_(),
            torch.clamp(absg, max=1.0, out=o[2]).ceil_().nan_to_num_(nan=1.0),  # 1 where grad != 0 (NaN too), else 0
            torch.mul(absg, 0.0, out=o[3]).nan_to_num_(nan=1.0),  # inf * 0 and NaN * 0 are NaN: 1, else 0
            torch.mul(update, update, out=o[4]),
            torch.mul(update, self.scale, out=o[5]).square_(),
        ]

    def per_weight(self, x: torch.Tensor, reduce) -> torch.Tensor:
        """Reduce (..., R, P) over each weight's columns: (..., R, n_layers) in ``layers`` order. Each run of
        evenly spaced weights is one view of its columns (a slice cut into rows of one stride) reduced at once;
        a last weight whose row of that stride would reach past the matrix's end is reduced on its own."""
        P, parts = x.shape[-1], []
        for run in self.runs:
            k = len(run.rows)
            whole = min(k, (P - run.offset) // run.stride)  # rows whose whole stride lies inside (all but the last)
            if whole:
                cols = x[..., run.offset:run.offset + whole * run.stride].unflatten(-1, (whole, run.stride))
                parts.append(reduce(cols[..., :run.numel], -1))
            for j in range(whole, k):
                start = run.offset + j * run.stride
                parts.append(reduce(x[..., start:start + run.numel], -1).unsqueeze(-1))
        return torch.cat(parts, dim=-1).index_select(-1, self.unpermute)

    def finish(self, sums: torch.Tensor, gmax: torch.Tensor, updated: torch.Tensor, hgrad: torch.Tensor,
               out_norm: torch.Tensor, batch: int, act_norm: torch.Tensor | None, width: int,
               saturated: torch.Tensor | None, pos_sum: torch.Tensor | None) -> torch.Tensor:
        """The (R, n_layers, len(LAYER_STATS)) statistics from their reductions: ``sums`` (N_TERMS, R, L) and
        ``gmax`` (R, L) from :meth:`per_weight`; ``hgrad``, ``out_norm`` (R, L) per layer output; per hidden
        block (R, blocks): ``act_norm``, ``saturated`` and ``pos_sum`` (R, blocks, width), each None where the
        activation has none. Shared by both engines."""
        R, dt = gmax.shape[0], gmax.dtype
        nan = torch.full((R, self.n_layers), float("nan"), dtype=dt, device=gmax.device)
        g2, g2_scaled, nonzero, nonfinite, u2, u2_scaled, w2 = sums.unbind(0)
        g_norm = self._norm(torch.sqrt(g2), torch.sqrt(g2_scaled))
        u_norm = self._norm(torch.sqrt(u2), torch.sqrt(u2_scaled))
        w_norm = torch.sqrt(w2)
        ratio = torch.where(updated.unsqueeze(1), u_norm / w_norm, nan)
        out_rms = out_norm / torch.sqrt(batch * self.widths)
        act_rms = sat = dead = nan
        if act_norm is not None:
            act_rms = nan.index_copy(1, self.hidden_rows, act_norm / (batch * width) ** 0.5)
        if saturated is not None:
            sat = nan.index_copy(1, self.hidden_rows, saturated)
        if pos_sum is not None:
            dead = nan.index_copy(1, self.hidden_rows, (pos_sum == 0).to(dt).mean(dim=2))
        return torch.stack([
            g_norm, g_norm / torch.sqrt(self.w_numel), gmax, (self.w_numel - nonzero) / self.w_numel, nonfinite,
            hgrad, w_norm, ratio, out_rms, act_rms, sat, dead,
        ], dim=2)

    def safe_norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm of each (B, w) matrix of x (..., B, w) that does not underflow: (...)."""
        return safe_norm(x, self.small, self.scale)

    def _norm(self, plain: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        """A norm from the plain one and the one of the entries times ``self.scale``: the plain one unless it is
        too small to be exact (below ``self.small``)."""
        return pick_norm(plain, scaled, self.small, self.scale)


def safe_norm(x: torch.Tensor, small: float, scale: float) -> torch.Tensor:
    """The norm of each (B, w) matrix of x (..., B, w), taken from the entries times ``scale`` where the plain
    one is below ``small`` (see :func:`small_scale`): (...)."""
    x = x.flatten(-2)
    return pick_norm(torch.linalg.vector_norm(x, dim=-1), torch.linalg.vector_norm(x * scale, dim=-1), small, scale)


def pick_norm(plain: torch.Tensor, scaled: torch.Tensor, small: float, scale: float) -> torch.Tensor:
    """A norm from the plain one and the one of the entries times ``scale``: the plain one unless it is too small
    to be exact (below ``small``)."""
    return torch.where(plain >= small, plain, scaled / scale)


class GradNorm(torch.autograd.Function):
    """``GradNorm.apply(h, token, small, scale)``: h unchanged, and in the backward pass each run's
    :func:`safe_norm` of dL/dh returned as the gradient of ``token`` (R,): the hgrad statistic reduced where
    autograd forms dL/dh, for a caller that cannot hook tensors (a compiled step), instead of dL/dh whole."""

    @staticmethod
    def forward(h: torch.Tensor, token: torch.Tensor, small: float, scale: float) -> torch.Tensor:
        return h.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.small, ctx.scale = inputs[2], inputs[3]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, safe_norm(grad, ctx.small, ctx.scale), None, None


def out_norm(h: torch.Tensor | None, moments: torch.Tensor | None = None) -> torch.Tensor:
    """The norm of each (B, w) layer output of h (..., B, w): (...); or the same from the output's ``moments``
    (..., 3, w) where a kernel took them (stacked.stacked_linear_stats: per unit the sums over the batch of h^2,
    relu(h) and relu(h)^2)."""
    if moments is not None:
        return torch.sqrt(moments[..., 0, :].sum(dim=-1))
    return torch.linalg.vector_norm(h.flatten(-2), dim=-1)


def block_terms(activation: str, act: torch.Tensor, act_input: torch.Tensor | None,
                moments: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A hidden block's forward-side reductions from its activation ``act`` (..., B, w) and the activation's
    input (needed for the ReLU family but ReLU): the activation's norm (...), its saturated fraction (...)
    for sigmoid/tanh, the sum over the batch of its positive part (..., w) for the ReLU family; else None.
    ``moments``: the activation input's, where a kernel took them (see :func:`out_norm`); what they hold is taken
    from them instead of from the tensors."""
    sat = pos_sum = None
    if activation in SATURATING:
        lo = -1.0 if activation == "tanh" else 0.0
        sat = ((act < lo + SATURATION_TOL) | (act > 1 - SATURATION_TOL)).flatten(-2).to(act.dtype).mean(dim=-1)
    if activation in RELU_FAMILY:
        # A unit is dead when no sample of the batch puts it on the positive side: the sum over the batch
        # of max(h, 0) is 0 (a sum over the middle axis is several times cheaper than a max). For ReLU
        # that is the activation's own output.
        if moments is not None:
            pos_sum = moments[..., 1, :]
        else:
            pos_sum = (act if activation == "relu" else act_input.clamp_min(0)).sum(dim=-2)
    if activation == "relu" and moments is not None:
        return torch.sqrt(moments[..., 2, :].sum(dim=-1)), sat, pos_sum
    return out_norm(act), sat, pos_sum


def small_scale(dtype: torch.dtype) -> tuple[float, float]:
    """(small, scale): a norm below ``small`` is taken from entries multiplied by ``scale``, a power of two.

    Below ``small`` (2^-50 in float32) every entry is below it too, so the scaled entries (at most 2^40) square
    without overflow, and an entry as small as the dtype's least subnormal squares to a normal number; above
    it, the squares that underflow are too small to change the sum. float64: 2^-100 and 2^600, likewise.
    """
    if dtype == torch.float64:
        return 2.0**-100, 2.0**600
    return 2.0**-50, 2.0**90
