"""``engine=compiled`` on the CPU: a training step in two calls of gradsweep's kernels (``csrc/fused.cpp``), compiled
ahead of time with the rest of them: the MLP's forward pass, loss and backward pass (:class:`FusedPass`), then the
update (:func:`update`); :class:`FusedStep` drives them.

The step programs of :mod:`gradsweep.engine.compiled`, run op by op or through ``torch.compile``, pass every layer's (R, B, w)
output and gradient through memory between ~20 kernel and elementwise calls, and the update's ~15 tensor ops each pass
over the (R, P) matrices; ``torch.compile`` costs 10-30 s per shape and ~5 s per process (importing torch's compiler,
loading the programs). Here each tile of 8 runs takes the batch, 16 rows at a time, through every layer, the loss and
back with every intermediate in cache; only the parameters are read and their gradients written. The statistics the
two passes give are summed as they go. The update then takes each run's row once: its norm, the divergence
bookkeeping, clipping, the optimiser and the per-weight statistics' sums. Nothing is compiled per shape: the library
is built once per machine and dtype (:mod:`gradsweep.engine.kernels.build`), so a first use and a rerun cost what eager does.

It covers the MLP without norm layers (every activation, residual or not, every loss, SGD and Adam); BatchNorm and
LayerNorm nets compile their step programs with ``torch.compile`` instead. It is the model (:func:`gradsweep.engine.mlp.
forward`, :func:`gradsweep.engine.losses.per_run_loss`) and the update (:mod:`gradsweep.engine.optim`) written a second time, in
C++: tests/test_fused.py checks each against the Python definitions in float64 (and tests/test_train.py the whole
engine against plain PyTorch).
"""

from __future__ import annotations

from typing import Any

import torch

from gradsweep.config.sections import ACTIVATIONS, ModelCfg
from gradsweep.engine.kernels.stacked import SUPPORTED, _fn, _ptr, _runs
from gradsweep.engine.mlp import RELU_FAMILY, SATURATING, ParamMap, layers
from gradsweep.engine.stats import StatsPlan, pick_norm, small_scale

ACT_CODES = {name: i for i, name in enumerate(
    ("sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "gelu", "selu", "identity"))}  # fused.cpp's enum
LOSS_CODES = {"mse": 0, "cross_entropy": 1, "projection": 2}
assert set(ACT_CODES) == set(ACTIVATIONS)


def applies(model: ModelCfg, loss: str, dtype: torch.dtype, linear_form: str) -> bool:
    """Whether a group of this shape can train through the fused kernel: an MLP without norm layers, where the Linear
    layers go through gradsweep's kernels (``linear_form``: :func:`gradsweep.engine.compiled.linear_form`, "kernel" on a CPU
    where they are built)."""
    return linear_form == "kernel" and model.norm == "none" and dtype in SUPPORTED and loss in LOSS_CODES


class FusedPass:
    """The forward and backward pass of a group's runs through the fused kernel: call it once per step."""

    def __init__(self, model: ModelCfg, layout: ParamMap, loss: str, dtype: torch.dtype):
        names, shapes, offsets = layout.names, layout.shapes, layout.offsets
        n_linear = model.depth + 1
        weights = [names.index(f"linear{i}.weight") for i in range(1, n_linear + 1)]
        dims = [shapes[weights[0]][1]] + [shapes[w][0] for w in weights]
        self.L, self.depth, self.width = n_linear, model.depth, model.width
        self.activation, self.loss, self.dtype = model.activation, loss, dtype
        self.residual = model.residual
        i64 = torch.int64
        self.dims = torch.tensor(dims, dtype=i64)
        self.w_off = torch.tensor([offsets[w] for w in weights], dtype=i64)
        self.b_off = torch.tensor([offsets[names.index(f"linear{i}.bias")] for i in range(1, n_linear + 1)], dtype=i64)
        self.slope_off = (torch.tensor([offsets[names.index(f"act{i}.weight")] for i in range(1, model.depth + 1)],
                                       dtype=i64) if model.activation == "prelu" else None)
        self.P = layout.size
        self.small, self.scale = small_scale(dtype)

    def __call__(self, flat: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor, stats: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """(loss (R,), the gradient (R, P), and with ``stats`` each Linear output's sums of (dL/dh)^2 and
        (dL/dh * scale)^2 (R, L, 2) and the forward pass's reductions as the step programs' forward hands them to their
        update; else None and {}) for parameters ``flat`` (R, P), inputs ``xb`` (R, B, in) and targets ``yb``."""
        R, P = flat.shape
        B = xb.shape[1]
        if (flat.dtype != self.dtype or P != self.P or not flat.is_contiguous() or xb.shape != (R, B, int(self.dims[0]))
                or xb.dtype != self.dtype or yb.shape[:2] != (R, B)):
            raise ValueError(f"gradsweep fused step: flat {tuple(flat.shape)} {flat.dtype}, x {tuple(xb.shape)} "
                             f"{xb.dtype}, y {tuple(yb.shape)} do not fit this net ({self.P} parameters, "
                             f"input {int(self.dims[0])}, {self.dtype})")
        (x, xs), (y, ys) = _runs(xb), _runs(yb)
        classes, n_out = self.loss == "cross_entropy", int(self.dims[-1])
        if classes and (y.dtype != torch.int64 or y.dim() != 2 or (y.numel() and not 0 <= y.min() <= y.max() < n_out)):
            raise ValueError(f"gradsweep fused step: cross_entropy needs (R, B) int64 class indices in [0, {n_out}), "
                             f"got {tuple(y.shape)} {y.dtype}")
        if not classes and (y.dtype != self.dtype or y.shape != (R, B, n_out)):
            raise ValueError(f"gradsweep fused step: targets must be {(R, B, n_out)} {self.dtype}, "
                             f"got {tuple(y.shape)} {y.dtype}")
        grad, loss = flat.new_empty(R, P), flat.new_empty(R)
        L, D, W = self.L, self.depth, self.width
        # the saturated units of sigmoid/tanh and the positive sums of the ReLU family: asked for where they exist
        saturating, relu_like = self.activation in SATURATING, self.activation in RELU_FAMILY
        out = ([flat.new_empty(R, L), flat.new_empty(R, D), flat.new_empty(R, D) if saturating else None,
                flat.new_empty(R, D, W) if relu_like else None, flat.new_empty(R, L, 2)] if stats else [None] * 5)
        _fn("mlp_step", self.dtype)(
            _ptr(x), xs, None if classes else _ptr(y), 0 if classes else ys, _ptr(y) if classes else None, ys if classes else 0,
            _ptr(flat), P, _ptr(grad), _ptr(loss), L, _ptr(self.dims), _ptr(self.w_off), _ptr(self.b_off),
            _ptr(self.slope_off), ACT_CODES[self.activation], int(self.residual), LOSS_CODES[self.loss], self.scale,
            self.small**2, *map(_ptr, out), R, B, torch.get_num_threads())
        if not stats:
            return loss, grad, None, {}
        hsq, zsq, sat, pos, gsq = out
        fwd = {"out_norm": torch.sqrt(hsq), "act_norm": torch.sqrt(zsq)}
        if saturating:
            fwd["saturated"] = sat / (B * W)
        if relu_like:
            fwd["pos_sum"] = pos
        return loss, grad, gsq, fwd


def update(flat: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor, alive: torch.Tensor, diverged: torch.Tensor,
           reason: torch.Tensor, step: int, opt: Any, max_norm: torch.Tensor,
           spans: tuple[torch.Tensor, torch.Tensor] | None,
           ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """One step's update after :class:`FusedPass`, in one call (``csrc/fused.cpp``, the formulas of
    :mod:`gradsweep.engine.optim`): divergence bookkeeping, clipping and ``opt``'s rule (a :class:`StackedOptimizer`, whose
    per-run settings and state it uses and updates), applied to ``flat`` in place; ``alive``, ``diverged`` and
    ``reason`` (R,) updated in place. Returns each run's gradient norm before clipping, whether clipping acted (1/0),
    and with ``spans`` (each weight's offsets and sizes, ``StatsPlan.offsets`` and ``numels`` as int64 tensors) the
    statistics' per-weight sums (7, R, L) and maxima (R, L) as ``stacked.sums`` gives them."""
    R, P = flat.shape
    for name, t, dtype in (("grad", grad, flat.dtype), ("loss", loss, flat.dtype), ("alive", alive, torch.bool),
                           ("diverged", diverged, torch.int64), ("reason", reason, torch.int64)):
        if t.dtype != dtype or t.shape[0] != R or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError(f"gradsweep fused update: {name} {tuple(t.shape)} {t.dtype} does not fit flat "
                             f"{tuple(flat.shape)} {flat.dtype}")
    if not flat.is_contiguous() or grad.shape != flat.shape:
        raise ValueError(f"gradsweep fused update: flat {tuple(flat.shape)} and grad {tuple(grad.shape)}")
    adam = opt.name == "adam"
    state = (None, opt.exp_avg, opt.exp_avg_sq) if adam else (opt.buf, None, None)
    hyper = ((opt.beta1, opt.beta2, opt.eps) if adam else (None, None, None))
    total, clipped = flat.new_empty(R), flat.new_empty(R)
    sums = gmax = off = num = None
    if spans is not None:
        off, num = spans
        if off.dtype != torch.int64 or num.dtype != torch.int64 or off.shape != num.shape or off.dim() != 1:
            raise ValueError("gradsweep fused update: spans must be two int64 vectors of one length (offsets, sizes)")
        sums, gmax = flat.new_empty(7, R, len(off)), flat.new_empty(R, len(off))
    _fn("mlp_update", flat.dtype)(
        _ptr(flat), _ptr(grad), _ptr(loss), _ptr(alive), _ptr(diverged), _ptr(reason), step, int(adam),
        int(opt.use_wd), *map(_ptr, state), _ptr(opt.lr), _ptr(opt.weight_decay),
        _ptr(None if adam else opt.momentum), *map(_ptr, hyper), _ptr(max_norm), _ptr(total), _ptr(clipped),
        _ptr(off), _ptr(num), len(off) if spans is not None else 0, _ptr(sums), _ptr(gmax), small_scale(flat.dtype)[1],
        R, P, torch.get_num_threads())
    return total, clipped, (sums, gmax) if spans is not None else None


class FusedStep:
    """One group's training state on the fused kernel: call it once per step, as :class:`gradsweep.engine.compiled.Step`
    (the same arguments and results). Statistics only on the steps that log them (``stats_now``)."""

    def __init__(self, model: ModelCfg, loss: str, layout: ParamMap, opt: Any, max_norm: torch.Tensor, stats: bool):
        """``opt``: the group's :class:`gradsweep.engine.optim.StackedOptimizer`, whose settings and state it uses."""
        self.opt, self.flat, self.max_norm = opt, opt.flat, max_norm
        self.pass_ = FusedPass(model, layout, loss, opt.flat.dtype)
        self.plan = StatsPlan(layout, layers(model), model.activation, opt.flat.dtype, opt.flat.device) if stats else None
        self.spans = (torch.tensor(self.plan.offsets), torch.tensor(self.plan.numels)) if stats else None
        self.width = model.width
        self.steps = 0

    @torch.no_grad()
    def __call__(self, xb: torch.Tensor, yb: torch.Tensor, alive: torch.Tensor, diverged: torch.Tensor,
                 reason: torch.Tensor, stats_now: bool = True) -> tuple[Any, ...]:
        """(alive, diverged, reason: updated in place; the step's (R, 3) loss, gradient norm and clipped; its
        (R, L, S) statistics, or None where not taken)."""
        plan = self.plan if stats_now else None
        loss, grad, gsq, fwd = self.pass_(self.flat, xb, yb, plan is not None)
        total, clipped, sums = update(self.flat, grad, loss, alive, diverged, reason, self.steps, self.opt,
                                      self.max_norm, self.spans if plan is not None else None)
        self.steps += 1
        self.opt.t = self.steps  # as the optimiser's own step would count
        scalars = torch.stack([loss, total, clipped], dim=1)
        if plan is None:
            return alive, diverged, reason, scalars, None
        hgrad = pick_norm(torch.sqrt(gsq[..., 0]), torch.sqrt(gsq[..., 1]), plan.small, plan.scale)
        lay = plan.finish(*sums, alive, hgrad, fwd["out_norm"], xb.shape[1], fwd["act_norm"], self.width,
                          fwd.get("saturated"), fwd.get("pos_sum"))
        return alive, diverged, reason, scalars, lay
