"""The training loop: R runs of one architecture trained side by side as one stacked model.

A single run is a group of one (trained as two copies, see train_group); the fused launcher hands whole
groups to the same loop.
Nothing here syncs with the device per step: statistics accumulate on the device and are copied
to the host once per block of logged steps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from gradsweep import compiled, fused
from gradsweep.compiled import Shape, Step, bucket, resolve_engine, runs_programs
from gradsweep.config import RunCfg
from gradsweep.data import load_data
from gradsweep.device import HOST_COPY_EVERY, position_independent_blas, resolve_device, set_threads
from gradsweep.identity import as_tuple
from gradsweep.losses import baseline_loss, per_run_accuracy, per_run_loss
from gradsweep.model import Layer, build_params, forward, layers
from gradsweep.modules import ModuleStep, build_stack
from gradsweep.nets import check_batch, describe, net_name
from gradsweep.optim import StackedOptimizer, clip, clip_vector, screen
from gradsweep.progress import bar as progress_bar
from gradsweep.schema import LAYER_STATS
from gradsweep.stats import StatsPlan

log = logging.getLogger(__name__)

DIVERGED_REASONS = (None, "loss", "gradient", "final loss")

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
    )


@dataclass
class GroupTrace:
    """What training a group recorded, as host arrays. T logged steps, R runs, L layers."""

    steps: np.ndarray
    """(T,) the logged step numbers."""
    loss: np.ndarray
    """(T, R) the loss at each logged step, before that step's update."""
    grad_norm: np.ndarray
    """(T, R) total gradient norm before clipping."""
    clipped: np.ndarray
    """(T, R) whether clipping scaled the gradients."""
    layer: np.ndarray | None
    """(T, R, L, len(schema.LAYER_STATS)) per-layer statistics in the training dtype, or None when not collected."""
    final_loss: np.ndarray
    """(R,) loss on the whole data set after the last step."""
    test_loss: np.ndarray
    """(R,) loss on the held-out points after the last step; NaN without them (data.n_test = 0)."""
    test_accuracy: np.ndarray
    """(R,) accuracy on the held-out points after the last step (classification data); NaN otherwise."""
    diverged_step: np.ndarray
    """(R,) first step with a non-finite loss or gradient norm (``steps`` = the final evaluation); -1 if none."""
    diverged_reason: np.ndarray
    """(R,) why: 'loss' (non-finite loss), 'gradient' (finite loss, non-finite gradient norm), 'final loss'; None."""
    wall_s: float
    """Wall-clock seconds for the whole group."""
    device: str
    engine: str = "eager"
    """The engine that trained the group (eager or compiled; engine=auto resolved)."""
    baseline_loss: float = float("nan")
    """The trivial predictor's loss on the training data (losses.baseline_loss); NaN where there is none."""
    input_q: float = float("nan")
    """The data's mean squared input entry (mean-field theory's q_in, for gradsweep.summary's predictions)."""
    in_dim: int = 0
    out_dim: int = 0
    """The data's input and output sizes."""
    layers: list[Layer] | None = None
    """The rows of ``layer``'s third axis (model.layers, or a module's recorded layers: gradsweep.nets)."""


def _logged(step: int, total: int, every: int) -> bool:
    return step % every == 0 or step == total - 1


def _batches(cfgs: list[RunCfg], n: int):
    """Yield the (R, B) sample indices of each step; None means the full batch for every run.

    Each run shuffles with its own generator seeded by train.seed, reshuffles every epoch and
    drops the last partial batch, so its order never depends on the other runs of its group.
    """
    bs = cfgs[0].train.batch_size
    if bs is None or bs >= n:
        while True:
            yield None
    gens = [torch.Generator().manual_seed(c.train.seed) for c in cfgs]
    while True:
        perms = torch.stack([torch.randperm(n, generator=g) for g in gens])
        for start in range(0, n - bs + 1, bs):
            yield perms[:, start:start + bs]


def train_group(cfgs: list[RunCfg], *, collect_stats: bool = True, progress: bool | None = None) -> GroupTrace:
    """Train every run of ``cfgs`` (which must share :func:`group_key`) as one stacked model."""
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
    # A module-built net (model.name: cnn, resmlp, custom) trains through gradsweep.modules, or through the built-in
    # engines where it is the built-in MLP (info.mlp); arch is the built-in MLP the engines compute.
    info = describe(first.model, first.data.in_dim, first.data.out_dim) if first.model.name != "mlp" else None
    for batch_size in {c.train.batch_size for c in cfgs}:  # one sample a step: one line
        check_batch(first.model, first.data.in_dim, first.data.out_dim, batch_size)
    arch = first.model if info is None else info.mlp
    fused_ok = arch is not None and fused.applies(arch, first.loss, dtype, compiled.linear_form(device))
    engine = (resolve_engine(first.engine, n_runs, first.train.steps, first.train.dtype, device, fused_ok)
              if arch is not None else "eager")
    if engine == "compiled" and not fused_ok:
        # padded to the bucket whose compiled program it shares (the fused kernel compiles nothing per shape); the
        # padding is dropped below
        cfgs = cfgs + [cfgs[-1]] * (bucket(len(cfgs)) - len(cfgs))
    if device.type == "cpu":
        set_threads()  # in every launcher: the cores free now, not one thread per core
        position_independent_blas()  # warns once per process where it does not hold
    steps, every = first.train.steps, first.train.log_every
    t0 = time.perf_counter()

    data = load_data(first.data)
    loss_name = first.loss

    def on_device(t: torch.Tensor) -> torch.Tensor:  # class indices stay integers
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    x, y = on_device(data.x), on_device(data.y)
    R, n = len(cfgs), x.shape[0]
    if info is None:
        stack = build_params(arch, [c.init for c in cfgs], [c.train.seed for c in cfgs], x.shape[1], data.out_dim,
                             dtype, device)
        rows = layers(arch)
    else:
        stack, buffers, base, rng = build_stack(first.model, info, cfgs, x.shape[1], data.out_dim, dtype, device)
        rows = list(info.layers)
    params, plist = stack.params, list(stack.params.values())
    opt = StackedOptimizer(stack.flat, [c.optim for c in cfgs])
    max_norm = clip_vector([c.train.clip_norm for c in cfgs], stack.flat)
    program_step = plan = module_step = None
    if arch is None:
        program_step = module_step = ModuleStep(net_name(first.model), info, base, stack, buffers, rng, loss_name, opt, max_norm,
                                                collect_stats, x.expand(R, *x.shape)[:, :2])
    elif engine == "compiled" and fused_ok:
        program_step = fused.FusedStep(arch, loss_name, stack.layout, opt, max_norm, collect_stats)
    elif runs_programs(engine, device):
        shape = Shape(arch, loss_name, opt.name, opt.name == "sgd" and opt.buf is not None, opt.use_wd,
                      collect_stats, dtype, device)
        program_step = Step(shape, stack.layout, plist, opt, max_norm, compiled=engine == "compiled")
    else:
        plan = StatsPlan(stack.layout, layers(arch), arch.activation, dtype, device)

    alive = torch.ones(R, dtype=torch.bool, device=device)
    diverged = torch.full((R,), -1, dtype=torch.long, device=device)
    reason = torch.zeros(R, dtype=torch.long, device=device)  # DIVERGED_REASONS index
    rec_scalar, rec_layer, host_scalar, logged = [], [], [], []
    # The statistics' host array, allocated once: each block of logged steps is stacked straight into it (one copy
    # of (R, L, S) per step; a list of blocks concatenated at the end, then widened to float64, was three, and at
    # 1,000 runs with every statistic every step they cost more than computing the statistics on the CPU).
    n_logged = sum(_logged(s, steps, every) for s in range(steps))
    host_layer = (torch.empty(n_logged, R, len(rows), len(LAYER_STATS), dtype=dtype)
                  if collect_stats else None)
    x_full, y_full = x.expand(R, *x.shape), y.expand(R, *y.shape)
    batches = _batches(cfgs, n)
    quiet = first.quiet if progress is None else not progress
    bar = progress_bar(total=steps, desc=f"train {n_runs} run{'s' if n_runs > 1 else ''}", quiet=quiet, leave=False,
                       unit="step")

    def flush() -> None:
        if rec_scalar:
            done = sum(len(block) for block in host_scalar)
            host_scalar.append(torch.stack(rec_scalar).cpu())
            if collect_stats:
                into = host_layer[done:done + len(rec_layer)]
                if device.type == "cpu":
                    torch.stack(rec_layer, out=into)
                else:
                    into.copy_(torch.stack(rec_layer))
            rec_scalar.clear()
            rec_layer.clear()

    def _eager_step(step, xb, yb, alive, diverged, reason, log_now):
        """One step of the eager engine: (alive, diverged, reason, and on a logged step its (R, 3) scalars and
        (R, L, S) statistics, else None)."""
        stats_now = collect_stats and log_now
        if stats_now:
            plan.start()
        fwd = forward(params, arch, xb, plan.probe if stats_now else None)
        loss = per_run_loss(loss_name, fwd.out, yb)
        grads = torch.autograd.grad(loss.sum(), plist)
        grad, total, alive, diverged, reason = screen(grads, loss, alive, diverged, reason, step)
        with torch.no_grad():
            if stats_now:
                plan.weight_sq(stack.flat)
            clipped_grad, clipped = clip(grad, total, max_norm)
            update = opt.step(clipped_grad, alive)
            scal = torch.stack([loss.detach(), total, clipped.to(dtype)], dim=1) if log_now else None
            lay = plan.collect(grad, update, alive) if stats_now else None
        return alive, diverged, reason, scal, lay

    try:  # the bar is cleared from the terminal even when training is interrupted
        for step in range(steps):
            idx = next(batches)
            if idx is None:
                xb, yb = x_full, y_full
            else:
                idx = idx.to(device, non_blocking=True)
                xb, yb = x[idx], y[idx]
            log_now = _logged(step, steps, every)
            if program_step is not None:
                # Compiled: statistics every step (one program, compiled once), recorded on the logged ones; run op
                # by op (eager on the CPU): statistics on the logged steps only.
                alive, diverged, reason, scal, lay = program_step(xb, yb, alive, diverged, reason,
                                                                  collect_stats and log_now)
            else:
                alive, diverged, reason, scal, lay = _eager_step(step, xb, yb, alive, diverged, reason, log_now)
            if log_now:
                rec_scalar.append(scal)
                logged.append(step)
                if collect_stats:
                    rec_layer.append(lay)
            bar.update(1)
            if len(rec_scalar) >= HOST_COPY_EVERY:
                flush()
                if not bool(alive.any()):  # one sync per block: stop once every run has diverged
                    break
        flush()
    finally:
        bar.close()

    def predict(inputs: torch.Tensor) -> torch.Tensor:
        return module_step.predict(inputs) if module_step is not None else forward(params, arch, inputs).out

    with torch.no_grad():
        final = per_run_loss(loss_name, predict(x_full), y_full)
        test_loss = test_acc = torch.full((R,), float("nan"), dtype=dtype)
        if len(data.y_test):
            xt, yt = on_device(data.x_test), on_device(data.y_test)
            out_t = predict(xt.expand(R, *xt.shape))
            yt = yt.expand(R, *yt.shape)
            test_loss = per_run_loss(loss_name, out_t, yt).cpu()
            if not yt.is_floating_point():
                test_acc = per_run_accuracy(out_t, yt).cpu()
    reason = torch.where(alive & ~torch.isfinite(final), 3, reason)
    diverged = torch.where(alive & ~torch.isfinite(final), steps, diverged)
    scal = torch.cat(host_scalar).numpy()[:, :n_runs]
    return GroupTrace(
        steps=np.asarray(logged, dtype=np.int64),
        loss=scal[:, :, 0].astype(np.float64),
        grad_norm=scal[:, :, 1].astype(np.float64),
        clipped=scal[:, :, 2] > 0,
        layer=host_layer[:len(scal), :n_runs].numpy() if collect_stats else None,
        final_loss=final.cpu().numpy()[:n_runs].astype(np.float64),
        test_loss=test_loss.numpy()[:n_runs].astype(np.float64),
        test_accuracy=test_acc.numpy()[:n_runs].astype(np.float64),
        diverged_step=diverged.cpu().numpy()[:n_runs],
        diverged_reason=np.array(DIVERGED_REASONS, dtype=object)[reason.cpu().numpy()[:n_runs]],
        wall_s=time.perf_counter() - t0,
        device=str(device),
        engine=engine,
        baseline_loss=baseline_loss(loss_name, data.y),
        input_q=float(data.x.double().square().mean()),
        in_dim=int(data.x.shape[1]),
        out_dim=int(data.out_dim),
        layers=rows,
    )

