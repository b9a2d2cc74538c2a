"""The training loop: R runs of one architecture trained side by side as one stacked model.

A single run is a group of one (trained as two copies, see train_group); the fused launcher hands whole
groups to the same loop.
Nothing here syncs with the device per step: statistics accumulate on the device and are copied
to the host once per block of logged steps.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from gradsweep.config.identity import as_tuple
from gradsweep.config.sections import RunCfg
from gradsweep.engine import compiled, curvature
from gradsweep.engine.compiled import Shape, Step, bucket, resolve_engine, runs_programs
from gradsweep.engine.data import load_data
from gradsweep.engine.device import position_independent_blas, resolve_device, set_threads
from gradsweep.engine.kernels import fused
from gradsweep.engine.losses import baseline_loss, per_run_accuracy, per_run_loss
from gradsweep.engine.mlp import Layer, build_params, forward, layers
from gradsweep.engine.module_runs import ModuleStep, build_stack
from gradsweep.engine.nets import check_batch, describe, net_name
from gradsweep.engine.optim import StackedOptimizer, clip, clip_vector, screen
from gradsweep.engine.stats import StatsPlan
from gradsweep.engine.trace import DIVERGED_REASONS, GroupTrace, Record, SharpnessLog, logged
from gradsweep.progress import bar as progress_bar

log = logging.getLogger(__name__)

def group_key(cfg: RunCfg) -> tuple:
    """Everything that fixes a run's computation shape or code path; runs with equal keys train as one group."""
    return (
        as_tuple(cfg.model),
        as_tuple(cfg.data),
        cfg.optim.name,
        cfg.train.steps,
        cfg.train.batch_size,
        cfg.train.log_every,
        cfg.train.dtype,
        cfg.device,
        cfg.engine,
        cfg.loss,
        as_tuple(cfg.stats),
    )


def _batches(cfgs: list[RunCfg], n: int):
    """Yield the (R, B) sample indices of each step; None means the full batch for every run.

    Each run shuffles with its own generator seeded by train.seed, reshuffles every epoch and
    drops the last partial batch, so its order never depends on the other runs of its group.
    """
    bs = cfgs[0].train.batch_size
    if cfgs[0].train.full_batch(n):
        while True:
            yield None
    gens = [torch.Generator().manual_seed(c.train.seed) for c in cfgs]
    while True:
        perms = torch.stack([torch.randperm(n, generator=g) for g in gens])
        for start in range(0, n - bs + 1, bs):
            yield perms[:, start:start + bs]


def initial_sharpness(cfgs: list[RunCfg]) -> curvature.Sharpness:
    """Every run's sharpness at its initial parameters, before the first batch (without training): the
    tuner's prior, and what a sweep measures at step 0."""
    g = _plan(cfgs)
    data = load_data(g.first.data)
    x, y = g.on_device(data.x), g.on_device(data.y)
    net = _build(g, x.shape[1], data.out_dim, False, x)
    s = _sharpness(g, net, x, y)
    return curvature.Sharpness(s.value[:g.n_runs], s.iters[:g.n_runs], s.converged[:g.n_runs], s.error)


def _sharpness(g: _Plan, net: _Net, x: torch.Tensor, y: torch.Tensor) -> curvature.Sharpness:
    """The top Hessian eigenvalue of each run's loss on the whole training set, at the parameters it has now (on
    the host). Every engine measures it eagerly (the forward pass of ``net.outputs``), and nothing of it reaches
    the training that follows: a module's random streams and buffers are restored."""
    R, stats = len(g.cfgs), g.first.stats
    xs, ys = x.expand(R, *x.shape), y.expand(R, *y.shape)
    s = curvature.sharpness(lambda: per_run_loss(g.first.loss, net.outputs(xs), ys), net.params,
                            tol=stats.sharpness_tol, max_iter=stats.sharpness_max_iter)
    if s.error is not None:
        log.warning("%s: no sharpness (its loss has no second derivative in PyTorch: %s); its sharpness columns are "
                    "null", net_name(g.first.model), s.error)
    return curvature.Sharpness(s.value.cpu(), s.iters, s.converged, s.error)


def train_group(cfgs: list[RunCfg], *, collect_stats: bool = True, progress: bool | None = None) -> GroupTrace:
    """Train every run of ``cfgs`` (which must share :func:`group_key`) as one stacked model."""
    t0 = time.perf_counter()
    g = _plan(cfgs)
    data = load_data(g.first.data)
    x, y = g.on_device(data.x), g.on_device(data.y)
    net = _build(g, x.shape[1], data.out_dim, collect_stats, x)
    steps = g.first.train.steps
    record = Record(steps, g.first.train.log_every, len(g.cfgs), len(net.rows), collect_stats, g.dtype, g.device)
    quiet = g.first.quiet if progress is None else not progress
    sharp = SharpnessLog(g.first.stats.sharpness_every) if g.first.stats.sharpness else None
    alive, diverged, reason = _loop(g, net, record, x, y, steps, collect_stats, quiet, sharp)
    if sharp is not None and sharp.error is None:
        sharp.add(None, _sharpness(g, net, x, y))
    with torch.no_grad():
        final, test_loss, test_acc = _evaluate(g, net, data, x, y)
    reason = torch.where(alive & ~torch.isfinite(final), 3, reason)
    diverged = torch.where(alive & ~torch.isfinite(final), steps, diverged)
    trace = _trace(g, net, data, record, final, test_loss, test_acc, diverged, reason, time.perf_counter() - t0)
    if sharp is not None:
        trace = dataclasses.replace(trace, **sharp.fields(len(trace.steps), g.n_runs))
    return trace


@dataclass
class _Plan:
    """A group's runs (a lone run doubled, padded to a compiled bucket) and how they train."""

    cfgs: list[RunCfg]
    n_runs: int
    """The caller's runs: the first ``n_runs`` of ``cfgs``."""
    device: torch.device
    dtype: torch.dtype
    info: Any
    """A module-built net's NetInfo (gradsweep.engine.nets.describe); None for the built-in MLP."""
    arch: Any
    """The built-in MLP the engines compute (the model, or info.mlp); None for a module only modules can run."""
    engine: str
    fused_ok: bool

    @property
    def first(self) -> RunCfg:
        return self.cfgs[0]

    def on_device(self, t: torch.Tensor) -> torch.Tensor:  # class indices stay integers
        return t.to(device=self.device, dtype=self.dtype if t.is_floating_point() else t.dtype)


def _plan(cfgs: list[RunCfg]) -> _Plan:
    first = cfgs[0]
    key = group_key(first)
    if any(group_key(c) != key for c in cfgs[1:]):
        raise ValueError("train_group needs runs that share group_key(); split them first")
    # A stack of one would take torch's matrix-matrix path instead of the batched one, whose rounding
    # differs: a lone run trains as a stack of two copies, so that a run alone and the same run in
    # any group compute bit for bit the same numbers (tests/test_train.py checks it).
    n_runs = len(cfgs)
    if n_runs == 1:
        cfgs = cfgs * 2
    device = resolve_device(first.device)
    dtype = getattr(torch, first.train.dtype)
    # A module-built net (model.name: cnn, resmlp, custom) trains through gradsweep.engine.module_runs, or through the built-in
    # engines where it is the built-in MLP (info.mlp).
    info = describe(first.model, first.data.in_dim, first.data.out_dim) if first.model.name != "mlp" else None
    for batch_size in {c.train.batch_size for c in cfgs}:  # one sample a step: one line
        check_batch(first.model, first.data.in_dim, first.data.out_dim, batch_size)
    arch = first.model if info is None else info.mlp
    fused_ok = arch is not None and fused.applies(arch, first.loss, dtype, compiled.linear_form(device))
    engine = (resolve_engine(first.engine, n_runs, first.train.steps, first.train.dtype, device, fused_ok)
              if arch is not None else "eager")
    if engine == "compiled" and not fused_ok:
        # padded to the bucket whose compiled program it shares (the fused kernel compiles nothing per shape); the
        # padding is dropped from the trace
        cfgs = cfgs + [cfgs[-1]] * (bucket(len(cfgs)) - len(cfgs))
    if device.type == "cpu":
        set_threads()  # in every launcher: the cores free now, not one thread per core
        position_independent_blas()  # warns once per process where it does not hold
    return _Plan(cfgs, n_runs, device, dtype, info, arch, engine, fused_ok)


@dataclass
class _Net:
    """The stacked parameters and the step that trains them: ``step(xb, yb, alive, diverged, reason, stats_now)``
    returns (alive, diverged, reason, the (R, 3) scalars, the (R, L, S) statistics or None)."""

    step: Any
    predict: Any
    """(R, N, in) inputs -> (R, N, out) outputs, for the final evaluation."""
    rows: list[Layer]
    outputs: Any
    """As ``predict``, in training mode and differentiable in ``params`` (the Hessian's products)."""
    params: list[torch.Tensor]
    """The (R, ...) parameter leaves."""


def _build(g: _Plan, in_dim: int, out_dim: int, collect_stats: bool, x: torch.Tensor) -> _Net:
    """The parameters of every run and the step kind that trains them: a module's, the fused kernel's, the step
    programs (compiled, or op by op through gradsweep's kernels), or the eager loop with its statistics plan."""
    first, arch, R = g.first, g.arch, len(g.cfgs)
    if g.info is None:
        stack = build_params(arch, [c.init for c in g.cfgs], [c.train.seed for c in g.cfgs], in_dim, out_dim,
                             g.dtype, g.device)
        rows = layers(arch)
    else:
        stack, buffers, base, rng = build_stack(first.model, g.info, g.cfgs, in_dim, out_dim, g.dtype, g.device)
        rows = list(g.info.layers)
    opt = StackedOptimizer(stack.flat, [c.optim for c in g.cfgs])
    max_norm = clip_vector([c.train.clip_norm for c in g.cfgs], stack.flat)
    if arch is None:
        module_step = ModuleStep(net_name(first.model), g.info, base, stack, buffers, rng, first.loss, opt, max_norm,
                                 collect_stats, x.expand(R, *x.shape)[:, :2])
        return _Net(module_step, module_step.predict, rows, module_step.outputs, list(stack.params.values()))
    if g.engine == "compiled" and g.fused_ok:
        step = fused.FusedStep(arch, first.loss, stack.layout, opt, max_norm, collect_stats)
    elif runs_programs(g.engine, g.device):
        shape = Shape(arch, first.loss, opt.name, opt.name == "sgd" and opt.buf is not None, opt.use_wd,
                      collect_stats, g.dtype, g.device)
        step = Step(shape, stack.layout, list(stack.params.values()), opt, max_norm, compiled=g.engine == "compiled")
    else:
        plan = StatsPlan(stack.layout, layers(arch), arch.activation, g.dtype, g.device)
        step = _EagerStep(arch, first.loss, stack, opt, max_norm, plan)
    outputs = lambda inputs: forward(stack.params, arch, inputs).out  # noqa: E731 - the two share one definition
    return _Net(step, outputs, rows, outputs, list(stack.params.values()))


class _EagerStep:
    """One step of the eager engine (torch ops, ``baddbmm``; statistics through the plan's probe and hooks)."""

    def __init__(self, arch: Any, loss_name: str, stack: Any, opt: StackedOptimizer, max_norm: Any, plan: StatsPlan):
        self.arch, self.loss_name, self.stack, self.plan = arch, loss_name, stack, plan
        self.opt, self.max_norm = opt, max_norm
        self.plist = list(stack.params.values())
        self.step = 0

    def __call__(self, xb, yb, alive, diverged, reason, stats_now):
        plan, step = self.plan, self.step
        self.step += 1
        if stats_now:
            plan.start()
        fwd = forward(self.stack.params, self.arch, xb, plan.probe if stats_now else None)
        loss = per_run_loss(self.loss_name, fwd.out, yb)
        grads = torch.autograd.grad(loss.sum(), self.plist)
        grad, total, alive, diverged, reason = screen(grads, loss, alive, diverged, reason, step)
        with torch.no_grad():
            if stats_now:
                plan.weight_sq(self.stack.flat)
            clipped_grad, clipped = clip(grad, total, self.max_norm)
            update = self.opt.step(clipped_grad, alive)
            scal = torch.stack([loss.detach(), total, clipped.to(loss.dtype)], dim=1)
            lay = plan.collect(grad, update, alive) if stats_now else None
        return alive, diverged, reason, scal, lay


def _loop(g: _Plan, net: _Net, record: Record, x: torch.Tensor, y: torch.Tensor, steps: int, collect_stats: bool,
          quiet: bool, sharp: SharpnessLog | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The steps, each on its batch, the sharpness measured where ``sharp`` says; stops early once every run has
    diverged. Returns alive, diverged, reason."""
    R, every = len(g.cfgs), g.first.train.log_every
    alive = torch.ones(R, dtype=torch.bool, device=g.device)
    diverged = torch.full((R,), -1, dtype=torch.long, device=g.device)
    reason = torch.zeros(R, dtype=torch.long, device=g.device)  # DIVERGED_REASONS index
    x_full, y_full = x.expand(R, *x.shape), y.expand(R, *y.shape)
    batches = _batches(g.cfgs, x.shape[0])
    bar = progress_bar(total=steps, desc=f"train {g.n_runs} run{'s' if g.n_runs > 1 else ''}", quiet=quiet,
                       leave=False, unit="step")
    try:  # the bar is cleared from the terminal even when training is interrupted
        for step in range(steps):
            idx = next(batches)
            if idx is None:
                xb, yb = x_full, y_full
            else:
                idx = idx.to(g.device, non_blocking=True)
                xb, yb = x[idx], y[idx]
            log_now = logged(step, steps, every)
            if log_now and sharp is not None and sharp.due(len(record.logged)):
                sharp.add(len(record.logged), _sharpness(g, net, x, y))
            # Compiled: statistics every step (one program, compiled once), recorded on the logged ones; run op by op
            # (eager on the CPU, the eager loop): statistics on the logged steps only.
            alive, diverged, reason, scal, lay = net.step(xb, yb, alive, diverged, reason, collect_stats and log_now)
            bar.update(1)
            if log_now and record.add(step, scal, lay) and not bool(alive.any()):
                break  # one sync per block: stop once every run has diverged
        record.flush()
    finally:
        bar.close()
    return alive, diverged, reason


def _evaluate(g: _Plan, net: _Net, data: Any, x: torch.Tensor, y: torch.Tensor):
    """The final loss on the training data, and the test loss and accuracy (NaN where the data has none)."""
    R = len(g.cfgs)
    final = per_run_loss(g.first.loss, net.predict(x.expand(R, *x.shape)), y.expand(R, *y.shape))
    test_loss = test_acc = torch.full((R,), float("nan"), dtype=g.dtype)
    if len(data.y_test):
        xt, yt = g.on_device(data.x_test), g.on_device(data.y_test)
        out_t = net.predict(xt.expand(R, *xt.shape))
        yt = yt.expand(R, *yt.shape)
        test_loss = per_run_loss(g.first.loss, out_t, yt).cpu()
        if not yt.is_floating_point():
            test_acc = per_run_accuracy(out_t, yt).cpu()
    return final, test_loss, test_acc


def _trace(g: _Plan, net: _Net, data: Any, record: Record, final, test_loss, test_acc, diverged, reason,
           wall_s: float) -> GroupTrace:
    """The host arrays of the caller's runs (the doubled or padded copies dropped)."""
    n = g.n_runs
    scal = torch.cat(record.host_scalar).numpy()[:, :n]
    return GroupTrace(
        steps=np.asarray(record.logged, dtype=np.int64),
        loss=scal[:, :, 0].astype(np.float64),
        grad_norm=scal[:, :, 1].astype(np.float64),
        clipped=scal[:, :, 2] > 0,
        layer=record.host_layer[:len(scal), :n].numpy() if record.collect_stats else None,
        final_loss=final.cpu().numpy()[:n].astype(np.float64),
        test_loss=test_loss.numpy()[:n].astype(np.float64),
        test_accuracy=test_acc.numpy()[:n].astype(np.float64),
        diverged_step=diverged.cpu().numpy()[:n],
        diverged_reason=np.array(DIVERGED_REASONS, dtype=object)[reason.cpu().numpy()[:n]],
        wall_s=wall_s,
        device=str(g.device),
        engine=g.engine,
        baseline_loss=baseline_loss(g.first.loss, data.y),
        input_q=float(data.x.double().square().mean()),
        in_dim=int(data.x.shape[1]),
        out_dim=int(data.out_dim),
        layers=net.rows,
    )

