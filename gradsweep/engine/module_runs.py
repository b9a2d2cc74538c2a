"""Module-built nets (gradsweep.engine.nets) trained as a stack of runs: each run's module drawn under its seed and init,
their parameters stacked into the (R, P) matrix the optimiser, clipping and statistics act on
(:class:`gradsweep.engine.mlp.Stack`), and every run's forward pass computed at once by ``torch.func.vmap`` over
``functional_call`` of one module, or run by run where vmap cannot take the module (randomness such as dropout,
data-dependent control flow, an operation without a batching rule): the same numbers either way, one log line
saying why.

The per-layer statistics come from forward hooks on the recorded layers (:class:`gradsweep.engine.nets.NetInfo`): each
layer's output gets a zero tap added (a (R, B, ...) leaf), whose gradient is dL/d(output), the backpropagated
signal; the output's norm is taken as it passes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, vmap

from gradsweep.config.sections import ModelCfg, RunCfg, first_line, linear_dims
from gradsweep.engine.init import apply_init
from gradsweep.engine.losses import per_run_loss
from gradsweep.engine.mlp import Stack, draw_linear
from gradsweep.engine.nets import NetInfo, as_mlp, build_net, init_module
from gradsweep.engine.optim import clip, screen
from gradsweep.engine.stats import StatsPlan

log = logging.getLogger(__name__)


def build_stack(model: ModelCfg, info: NetInfo, cfgs: list[RunCfg], in_dim: int, out_dim: int, dtype: torch.dtype,
                device: torch.device | str) -> tuple[Stack, dict[str, torch.Tensor], nn.Module, Streams]:
    """The runs' modules drawn (``torch.manual_seed(train.seed)``, built, every Linear/Conv re-initialised by
    ``init`` in module order; the global RNG restored), and their parameters stacked: (stack, the buffers and
    frozen parameters stacked (R, ...), run 0's module, each run's random streams after its draws). A module the
    built-in MLP computes (``info.mlp``) gets the built-in parameter names (``linear1.weight``, ...), for the built-in
    engines."""
    nets, cpu = [], []
    with torch.random.fork_rng(devices=[]):
        for c in cfgs:
            torch.default_generator.manual_seed(c.train.seed)
            net = build_net(model, in_dim, out_dim)
            init_module(net, c.init)
            nets.append(net)
            cpu.append(torch.get_rng_state())  # where the run's own stream goes on (dropout, run by run)
            if len(nets) == 1 and info.mlp is not None and _drawn_alike(net, c, in_dim, out_dim):
                break  # the built-in MLP: the other runs' draws without building their modules (below)
    per_run = [{n: p for n, p in net.named_parameters() if p.requires_grad} for net in nets]
    if info.mlp is not None:  # nn.Sequential: Linear i is child 2(i - 1)
        per_run = [{f"linear{int(name.split('.')[0]) // 2 + 1}.{name.split('.')[1]}": t for name, t in p.items()}
                   for p in per_run]
        per_run += [_mlp_draws(info.mlp, c, in_dim, out_dim) for c in cfgs[len(per_run):]]
    stack = Stack.of(per_run, dtype, device)
    buffers = {}  # and the frozen parameters (requires_grad=False): passed along, never trained
    for name, first in [*nets[0].named_buffers(), *((n, p) for n, p in nets[0].named_parameters() if not p.requires_grad)]:
        stacked = torch.stack([net.get_parameter(name) if isinstance(first, nn.Parameter) else net.get_buffer(name)
                               for net in nets]).detach()
        buffers[name] = stacked.to(device=device, dtype=dtype if first.is_floating_point() else first.dtype)
    return stack, buffers, nets[0], Streams(device, cpu, [c.train.seed for c in cfgs[:len(cpu)]])


class Streams:
    """Each run's random streams, run by run: the CPU generator's state after its draws and, on CUDA, the device
    generator's, seeded with the run's seed as ``torch.manual_seed`` seeds it (the draws were on the CPU). Inside
    :meth:`run`, run ``r``'s random operations (dropout) draw from its own streams, as its own script's would, whatever
    its group; the global generators are left as they were."""

    def __init__(self, device: torch.device | str, cpu: list[torch.Tensor], seeds: list[int]) -> None:
        device = torch.device(device)
        self.cpu = cpu
        self.index = (device.index if device.index is not None else torch.cuda.current_device()) \
            if device.type == "cuda" else None
        self.cuda: list[torch.Tensor] = []
        if self.index is not None:
            with torch.random.fork_rng(devices=[self.index]), torch.cuda.device(self.index):
                for seed in seeds:
                    torch.cuda.manual_seed(seed)
                    self.cuda.append(torch.cuda.get_rng_state(self.index))

    @contextlib.contextmanager
    def run(self, r: int) -> Iterator[None]:
        """Run ``r``'s streams as the global generators' for the block."""
        with torch.random.fork_rng(devices=[] if self.index is None else [self.index]):
            torch.set_rng_state(self.cpu[r])
            if self.index is not None:
                torch.cuda.set_rng_state(self.cuda[r], self.index)
            yield
            self.cpu[r] = torch.get_rng_state()
            if self.index is not None:
                self.cuda[r] = torch.cuda.get_rng_state(self.index)


def _mlp_draws(mlp: ModelCfg, cfg: RunCfg, in_dim: int, out_dim: int) -> dict[str, torch.Tensor]:
    """What a module the built-in MLP computes draws (a run's seed, each nn.Linear's reset_parameters in order,
    then the init in module order), by the built-in MLP's names, without building the module: a tenth of the cost."""
    out = {}
    with torch.random.fork_rng(devices=[]):  # the init's draws continue the run's stream, after every Linear's
        torch.default_generator.manual_seed(cfg.train.seed)
        drawn = [draw_linear(fan_in, fan_out) for fan_in, fan_out in linear_dims(mlp, in_dim, out_dim)]
        for i, (weight, bias) in enumerate(drawn, start=1):
            apply_init(weight, bias, cfg.init)
            out[f"linear{i}.weight"], out[f"linear{i}.bias"] = weight, bias
    return out


def _drawn_alike(net: nn.Module, cfg: RunCfg, in_dim: int, out_dim: int) -> bool:
    """Whether :func:`_mlp_draws` gives the parameters the user's constructor gave ``net`` (the first run's, bit
    for bit): the constructor draws nothing else."""
    mine = _mlp_draws(as_mlp(net, in_dim), cfg, in_dim, out_dim)
    theirs = [p.detach() for p in net.parameters()]
    return len(mine) == len(theirs) and all(torch.equal(a, b) for a, b in zip(mine.values(), theirs))


class ModuleStep:
    """One group's training state for a module-built net: call it once per step, as :class:`gradsweep.engine.compiled.Step`
    (the same arguments and results); :meth:`predict` for the evaluations after training.

    A recorded layer's output norm is taken as it passes (an in-place operation after it may overwrite it). Its
    backpropagated signal: through vmap, the gradient of a zero tap added to the output (a (R, B, ...) leaf, of the
    shape the layer gave before training); run by run, a hook on the output tensor, so a layer only some runs call
    (a branch) is recorded where it is called and NaN elsewhere."""

    def __init__(self, name: str, info: NetInfo, base: nn.Module, stack: Stack, buffers: dict[str, torch.Tensor],
                 rng: Streams, loss: str, opt: Any, max_norm: torch.Tensor, stats: bool,
                 example: torch.Tensor):
        """``base``: one run's module, whose own tensors every call replaces; ``rng``: each run's random streams (run
        by run, each run's random operations draw from its own, as its script's would, whatever its group);
        ``example``: a (R, B, in) batch, for the check that vmap takes the module."""
        self.info, self.stack, self.buffers, self.loss, self.rng = info, stack, buffers, loss, rng
        self.params, self.plist = stack.params, list(stack.params.values())
        self.opt, self.max_norm, self.steps = opt, max_norm, 0
        self.base = base.to(device=stack.flat.device, dtype=stack.flat.dtype)
        dtype, device = stack.flat.dtype, stack.flat.device
        # out_rms is taken whole in the hooks: the plan's per-layer width is 1 and its batch 1
        self.plan = (StatsPlan(stack.layout, list(info.layers), "identity", dtype, device,
                               widths=[1] * len(info.layers)) if stats else None)
        self._taps: dict[int, torch.Tensor] | None = None
        self._rms: dict[int, torch.Tensor] | None = None
        self._hgrad: dict[int, torch.Tensor] | None = None
        modules = dict(self.base.named_modules())
        for k, layer in enumerate(info.layers):
            modules[layer.path].register_forward_hook(self._hook(k))
        self.vmapped = True
        try:  # one forward and backward pass of the real batch, on copies of the buffers (BatchNorm updates them)
            taps = self._new_taps(example.shape[0], example.shape[1]) if stats else None
            out = self._forward(example, taps, {k: v.clone() for k, v in buffers.items()}, stats)[0]
            torch.autograd.grad(out.sum(), self.plist + list((taps or {}).values()), allow_unused=True)
        except Exception as e:  # noqa: BLE001 - whatever vmap cannot take trains run by run, with the same numbers
            self.vmapped = False
            log.warning("%s: its runs train one by one, not fused (torch.func.vmap: %s)", name, first_line(e))

    def _hook(self, k: int):
        def hook(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
            if self._rms is not None:
                self._rms[k] = torch.linalg.vector_norm(output.detach()) / output.numel() ** 0.5
            if self._taps is not None and k in self._taps:
                return output + self._taps[k]
            if self._hgrad is not None and output.requires_grad:  # run by run: dL/d(output) as autograd forms it
                output.register_hook(functools.partial(self._record_hgrad, self._hgrad, k))
                return output + 0  # what follows (an in-place op) works on a copy: the hook sees this output's own
            return output
        return hook

    def _record_hgrad(self, into: dict[int, torch.Tensor], k: int, grad: torch.Tensor) -> None:
        into[k] = self.plan.safe_norm(grad.reshape(1, -1))

    def _new_taps(self, R: int, B: int) -> dict[int, torch.Tensor]:
        """Zero taps for the layers whose output shape is known (the ones called before training)."""
        flat = self.stack.flat
        return {k: torch.zeros(R, *shape[:axis], B, *shape[axis:], dtype=flat.dtype, device=flat.device,
                               requires_grad=True)
                for k, (shape, axis) in enumerate(zip(self.info.out_shapes, self.info.batch_axes)) if shape is not None}

    def _one(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor,
             taps: dict[int, torch.Tensor] | None, record: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """One run's output, and with ``record`` each layer's output RMS (NaN where this run did not call it)."""
        self._taps, self._rms = taps, ({} if record else None)
        try:
            out = functional_call(self.base, (params, buffers), (x,))
            nan = out.new_full((), float("nan"))
            rms = tuple(self._rms.get(k, nan) for k in range(len(self.info.layers))) if record else ()
        finally:
            self._taps = self._rms = None
        return out, rms

    def _forward(self, x: torch.Tensor, taps: dict[int, torch.Tensor] | None, buffers: dict[str, torch.Tensor],
                 record: bool) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], list[dict[int, torch.Tensor]]]:
        """Every run's output (R, B, out) for inputs x (R, B, in); with ``record`` each layer's output RMS (R,) and,
        run by run, per run the dict its layers' dL/d(output) norms fill during the backward pass."""
        if self.vmapped:
            fn = vmap(lambda p, b, xr, t: self._one(p, b, xr, t, record), in_dims=(0, 0, 0, None if taps is None else 0),
                      randomness="error")
            return (*fn(self.params, buffers, x, taps), [])
        outs, rms, hgrads = [], [], []
        for r in range(x.shape[0]):
            self._hgrad = {} if record else None
            try:
                with self.rng.run(r):
                    out, lay = self._one({n: p[r] for n, p in self.params.items()},
                                         {n: b[r] for n, b in buffers.items()}, x[r], None, record)
            finally:
                hgrads.append(self._hgrad)
                self._hgrad = None
            outs.append(out)
            rms.append(lay)
        return torch.stack(outs), tuple(torch.stack(col) for col in zip(*rms)) if record else (), hgrads

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor, alive: torch.Tensor, diverged: torch.Tensor,
                 reason: torch.Tensor, stats_now: bool = True) -> tuple[Any, ...]:
        """(alive, diverged, reason; the step's (R, 3) loss, gradient norm and clipped; its (R, L, S) statistics, or
        None where not taken)."""
        plan = self.plan if stats_now else None
        R, B = xb.shape[:2]
        self.base.train()
        taps = self._new_taps(R, B) if plan is not None and self.vmapped else {}
        out, rms, hgrads = self._forward(xb, taps or None, self.buffers, plan is not None)
        loss = per_run_loss(self.loss, out, yb)
        leaves = self.plist + list(taps.values())
        grads = torch.autograd.grad(loss.sum(), leaves, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(leaves, grads)]
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
            rms = torch.stack(rms, dim=1)
            nan = torch.full((R,), float("nan"), dtype=rms.dtype, device=rms.device)
            if self.vmapped:
                by_layer = dict(zip(taps, (plan.safe_norm(g.reshape(R, 1, -1)) for g in grads[len(self.plist):])))
                hgrad = torch.stack([by_layer.get(k, nan) for k in range(len(self.info.layers))], dim=1)
            else:
                hgrad = torch.stack([torch.stack([h.get(k, nan[0]).reshape(()) for k in range(len(self.info.layers))])
                                     for h in hgrads])
            hgrad = torch.where(rms.isnan(), rms, hgrad)  # a layer the run did not call: no signal recorded
            return alive, diverged, reason, scalars, plan.reduce(grad, update, alive, hgrad, rms, 1)

    def outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Every run's output (R, B, out) in training mode, differentiable in the parameters (for the Hessian's
        products, gradsweep.engine.curvature): on copies of the buffers, and each run's random streams put back
        after, so the training that follows draws what it would have drawn without this call."""
        saved = list(self.rng.cpu), list(self.rng.cuda)
        try:
            return self._forward(x, None, {k: v.clone() for k, v in self.buffers.items()}, False)[0]
        finally:
            self.rng.cpu[:], self.rng.cuda[:] = saved

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Every run's output (R, B, out) in eval mode (BatchNorm's running statistics, no dropout), the buffers
        untouched."""
        self.base.eval()
        try:
            return self._forward(x, None, self.buffers, False)[0]
        finally:
            self.base.train()
