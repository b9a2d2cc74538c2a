"""Module-built nets (gradsweep.nets) trained as a stack of runs: each run's module drawn under its seed and init,
their parameters stacked into the (R, P) matrix the optimiser, clipping and statistics act on
(:class:`gradsweep.model.Stack`), and every run's forward pass computed at once by ``torch.func.vmap`` over
``functional_call`` of one module, or run by run where vmap cannot take the module (randomness such as dropout,
data-dependent control flow, an operation without a batching rule): the same numbers either way, one log line
saying why.

The per-layer statistics come from forward hooks on the recorded layers (:class:`gradsweep.nets.NetInfo`): each
layer's output gets a zero tap added (a (R, B, ...) leaf), whose gradient is dL/d(output), the backpropagated
signal; the output's norm is taken as it passes.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from gradsweep.config import ModelCfg, RunCfg, first_line
from gradsweep.losses import per_run_loss
from gradsweep.model import Stack
from gradsweep.nets import NetInfo, build_net, init_module
from gradsweep.optim import clip, screen
from gradsweep.stats import StatsPlan, out_norm

log = logging.getLogger(__name__)


def build_stack(model: ModelCfg, info: NetInfo, cfgs: list[RunCfg], in_dim: int, out_dim: int, dtype: torch.dtype,
                device: torch.device | str) -> tuple[Stack, dict[str, torch.Tensor], nn.Module]:
    """The runs' modules drawn (``torch.manual_seed(train.seed)``, built, every Linear/Conv re-initialised by
    ``init`` in module order; the global RNG restored), and their parameters stacked: (stack, the buffers stacked
    (R, ...), run 0's module). A module the built-in MLP computes (``info.mlp``) gets the built-in parameter names
    (``linear1.weight``, ...), for the built-in engines."""
    nets = []
    with torch.random.fork_rng(devices=[]):
        for c in cfgs:
            torch.default_generator.manual_seed(c.train.seed)
            net = build_net(model, in_dim, out_dim)
            init_module(net, c.init)
            nets.append(net)
    per_run = [dict(net.named_parameters()) for net in nets]
    if info.mlp is not None:  # nn.Sequential: Linear i is child 2(i - 1)
        per_run = [{f"linear{int(name.split('.')[0]) // 2 + 1}.{name.split('.')[1]}": t for name, t in p.items()}
                   for p in per_run]
    stack = Stack.of(per_run, dtype, device)
    buffers = {}
    for name, first in nets[0].named_buffers():
        stacked = torch.stack([dict(net.named_buffers())[name] for net in nets])
        buffers[name] = stacked.to(device=device, dtype=dtype if first.is_floating_point() else first.dtype)
    return stack, buffers, nets[0]


class ModuleStep:
    """One group's training state for a module-built net: call it once per step, as :class:`gradsweep.compiled.Step`
    (the same arguments and results); :meth:`predict` for the evaluations after training."""

    def __init__(self, name: str, info: NetInfo, base: nn.Module, stack: Stack, buffers: dict[str, torch.Tensor],
                 loss: str, opt: Any, max_norm: torch.Tensor, stats: bool, example: torch.Tensor):
        """``base``: one run's module, whose own tensors every call replaces; ``example``: a (R, B, in) batch, for
        the check that vmap takes the module."""
        self.info, self.stack, self.buffers, self.loss = info, stack, buffers, loss
        self.params, self.plist = stack.params, list(stack.params.values())
        self.opt, self.max_norm, self.steps = opt, max_norm, 0
        self.base = base.to(device=stack.flat.device, dtype=stack.flat.dtype)
        dtype, device = stack.flat.dtype, stack.flat.device
        self.plan = (StatsPlan(stack.layout, list(info.layers), "identity", dtype, device,
                               widths=[_numel(s) for s in info.out_shapes]) if stats else None)
        self._taps: tuple[torch.Tensor, ...] | None = None
        self._outs: dict[int, torch.Tensor] | None = None
        modules = dict(self.base.named_modules())
        for k, layer in enumerate(info.layers):
            modules[layer.path].register_forward_hook(self._hook(k))
        self.vmapped = True
        try:  # one forward and backward pass of the real batch, on copies of the buffers (BatchNorm updates them)
            taps = self._new_taps(example.shape[0], example.shape[1]) if stats else None
            out, _ = self._forward(example, taps, {k: v.clone() for k, v in buffers.items()}, stats)
            torch.autograd.grad(out.sum(), self.plist + list(taps or ()), allow_unused=True)
        except Exception as e:  # noqa: BLE001 - whatever vmap cannot take trains run by run, with the same numbers
            self.vmapped = False
            log.info("%s: its runs train one by one, not fused (torch.func.vmap: %s)", name, first_line(e))

    def _hook(self, k: int):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if self._taps is not None:
                output = output + self._taps[k]
            if self._outs is not None:
                self._outs[k] = output
            return output
        return hook

    def _new_taps(self, R: int, B: int) -> tuple[torch.Tensor, ...]:
        flat = self.stack.flat
        return tuple(torch.zeros(R, B, *shape, dtype=flat.dtype, device=flat.device, requires_grad=True)
                     for shape in self.info.out_shapes)

    def _one(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
             taps: tuple[torch.Tensor, ...] | None, record: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        self._taps, self._outs = taps, ({} if record else None)
        try:
            out = functional_call(self.base, (params, buffers), (x,))
            outs = tuple(self._outs[k] for k in range(len(self.info.layers))) if record else ()
        finally:
            self._taps = self._outs = None
        return out, outs

    def _forward(self, x: torch.Tensor, taps: tuple[torch.Tensor, ...] | None, buffers: dict[str, torch.Tensor],
                 record: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Every run's output (R, B, out) for inputs x (R, B, in), and with ``record`` each layer's output."""
        if self.vmapped:
            fn = vmap(lambda p, b, xr, t: self._one(p, b, xr, t, record), in_dims=(0, 0, 0, None if taps is None else 0),
                      randomness="error")
            return fn(self.params, buffers, x, taps)
        outs, layer_outs = [], []
        for r in range(x.shape[0]):
            out, lay = self._one({n: p[r] for n, p in self.params.items()}, {n: b[r] for n, b in buffers.items()},
                                 x[r], None if taps is None else tuple(t[r] for t in taps), record)
            outs.append(out)
            layer_outs.append(lay)
        return torch.stack(outs), tuple(torch.stack(col) for col in zip(*layer_outs)) if record else ()

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor, alive: torch.Tensor, diverged: torch.Tensor,
                 reason: torch.Tensor, stats_now: bool = True) -> tuple[Any, ...]:
        """(alive, diverged, reason; the step's (R, 3) loss, gradient norm and clipped; its (R, L, S) statistics, or
        None where not taken)."""
        plan = self.plan if stats_now else None
        R, B = xb.shape[:2]
        self.base.train()
        taps = self._new_taps(R, B) if plan is not None else None
        out, outs = self._forward(xb, taps, self.buffers, plan is not None)
        loss = per_run_loss(self.loss, out, yb)
        grads = torch.autograd.grad(loss.sum(), self.plist + list(taps or ()), allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.plist + list(taps or ()), grads)]
        grad, total, alive, diverged, reason = screen(grads[:len(self.plist)], loss, alive, diverged, reason,
                                                      self.steps)
        self.steps += 1
        with torch.no_grad():
            if plan is not None:
                plan.weight_sq(self.stack.flat)
            clipped_grad, clipped = clip(grad, total, self.max_norm)
            update = self.opt.step(clipped_grad, alive)
            scalars = torch.stack([loss.detach(), total, clipped.to(loss.dtype)], dim=1)
            if plan is None:
                return alive, diverged, reason, scalars, None
            hgrad = torch.stack([plan.safe_norm(g.reshape(R, 1, -1)) for g in grads[len(self.plist):]], dim=1)
            norms = torch.stack([out_norm(o.detach().reshape(R, 1, -1)) for o in outs], dim=1)
            return alive, diverged, reason, scalars, plan.reduce(grad, update, alive, hgrad, norms, B)

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Every run's output (R, B, out) in eval mode (BatchNorm's running statistics, no dropout), the buffers
        untouched."""
        self.base.eval()
        try:
            return self._forward(x, None, self.buffers, False)[0]
        finally:
            self.base.train()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
