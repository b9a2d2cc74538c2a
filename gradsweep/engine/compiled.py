"""``engine=compiled``: a group's training step as two ``torch.compile``'d programs and autograd's backward between.
On the CPU, where gradsweep's kernels are built, ``engine=eager`` runs the same two programs uncompiled (:class:`Step`,
:func:`runs_programs`), and ``engine=compiled`` is the fused kernel instead where it applies (nets without norm layers,
:mod:`gradsweep.engine.kernels.fused`).

The step computes what the eager loop in :mod:`gradsweep.engine.train` computes, from the same definitions (the
model's ``forward``, ``losses.per_run_loss``, ``optim.clip``, ``optim.sgd_update``/``adam_update``):

1. *forward*: forward pass and per-run loss, each Linear on the CPU through gradsweep's own kernel
   (``model.linear(form="kernel")``, :mod:`gradsweep.engine.kernels.stacked`: 8 runs per SIMD register, one opaque op for
   inductor, its backward too; 2-3x ``bmm`` at the article's widths), on CUDA as ``bmm`` + bias (the form inductor's
   GEMM templates compile), each layer output passed through ``stats.GradNorm`` (an identity whose backward also
   returns each run's norm of dL/d(output), reduced where autograd forms it: a compiled graph has no tensor to
   hook, and returning dL/d(output) whole costs a write and a read of every layer's (R, B, w) gradient);
2. autograd's backward of that program (compiled with it by AOTAutograd);
3. *update*: gradient norm, divergence bookkeeping, clipping, the optimiser and every per-layer statistic of
   ``stats.LAYER_STATS``, fused; the statistics are the eager engine's ``StatsPlan`` reductions and assembly
   (equally sized weights reduced together: the per-weight part of the program does not grow with depth). The
   forward-side reductions (layer output and activation norms, saturated and dead units) are taken in the forward
   program where each tensor is made, which hands the update only their (R, L) results; with the ``bmm`` form
   (CUDA) the update takes them from the forward's tensors instead: in the forward program inductor fuses them into
   the GEMM template's epilogue and fails an assertion (torch 2.13).

Nothing in either program depends on a Python number that changes between steps: the step count and the
divergence state are tensors, so one compiled program serves every step, and on CUDA it runs as a CUDA graph
(inductor's ``reduce-overhead`` mode: static input buffers, no host sync per step).

Compilation is per *shape*: the model config, loss, optimiser kind, dtype, device, batch and the number of runs,
which is rounded up to a bucket (:func:`bucket`) so that groups of nearby sizes share one program. Inductor's
on-disk caches (FX graph, AOTAutograd, autotuning) make a second process with the same shape skip compilation;
they live in ``TORCHINDUCTOR_CACHE_DIR`` (default here: ``$GRADSWEEP_CACHE_DIR/inductor``, ``~/.cache/gradsweep/inductor``
without it).

The numbers equal the eager engine's up to rounding order (float64: rtol 1e-9, tests/test_compiled.py), not bit
for bit, so ``engine`` is not part of a run's identity: a sweep resumed with another engine keeps its runs.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from gradsweep.config.sections import ModelCfg
from gradsweep.engine.kernels.build import cache_root
from gradsweep.engine.losses import per_run_loss
from gradsweep.engine.mlp import RELU_FAMILY, ParamMap, forward, layers
from gradsweep.engine.optim import StackedOptimizer, adam_update, clip, screen, sgd_update
from gradsweep.engine.programs import Program
from gradsweep.engine.stats import GradNorm, StatsPlan, block_terms, out_norm, pick_norm
from gradsweep.errors import ConfigError

# engine=auto on the CPU. Where the fused kernel applies (gradsweep.engine.kernels.fused: the kernels built, no norm
# layers) auto is compiled: nothing is compiled per shape, and it beats eager at every run count (BENCHMARKS.md, the CPU engines).
# Else, where gradsweep's kernels are built (norm layers), both engines run the same programs through them, eager op
# by op, and torch.compile's gain there is within run-to-run noise after a compile of tens of seconds: auto stays
# eager (None). Without the kernels (GRADSWEEP_KERNELS=0, or no C++ compiler: then eager only) eager is the baddbmm
# loop, which compiling beats once a group is big enough to repay the compile: auto compiles float32 groups from this
# many run-steps (runs x steps), above the cold break-even that scripts/bench_peers.py measures.
AUTO_MIN_RUN_STEPS_CPU: int | None = None
AUTO_MIN_RUN_STEPS_CPU_NO_KERNEL = 300_000
# On CUDA, auto stays eager until scripts/gpu_check.sh has shown the compiled step (CUDA graphs) right on a GPU:
# it is built and tested on CPU only so far.
AUTO_ON_CUDA = "eager"
RECOMPILE_LIMIT = 64  # distinct shapes one process may compile (dynamo's default, 8, is hit by a varied sweep)


def resolve_engine(engine: str, runs: int, steps: int, dtype: str, device: torch.device, fused: bool = False) -> str:
    """The engine a group trains with: ``auto`` -> compiled where the fused kernel applies (``fused``:
    :func:`gradsweep.engine.kernels.fused.applies`) or compiling pays (see the constants above)."""
    if device.type == "cpu" and engine != "eager" and not has_cxx():
        if engine == "compiled":
            raise ConfigError("engine='compiled' is not valid here: torch.compile on the CPU needs a C++ compiler "
                              "(g++ or clang++, or $CXX) and none is on PATH; valid values: auto, eager")
        return "eager"
    if engine != "auto":
        return engine
    if device.type == "cuda":
        return AUTO_ON_CUDA
    if fused:
        return "compiled"
    least = AUTO_MIN_RUN_STEPS_CPU if linear_form(device) == "kernel" else AUTO_MIN_RUN_STEPS_CPU_NO_KERNEL
    return "compiled" if dtype == "float32" and least is not None and runs * steps >= least else "eager"


def has_cxx() -> bool:
    """Whether inductor (and the stacked-Linear kernel) can build CPU kernels here: a C++ compiler on PATH."""
    from gradsweep.engine.kernels.build import compiler

    return compiler() is not None


def bucket(runs: int) -> int:
    """The stack size a group of ``runs`` compiles for: a power of two or a multiple of an eighth of one (at most
    ~12% padding), so that groups of nearby sizes share one compiled program."""
    if runs <= 8:
        return max(2, runs)
    top = 1 << (runs - 1).bit_length()
    step = top // 16
    return -(-runs // step) * step


def linear_form(device: torch.device) -> str:
    """How the compiled programs compute a Linear layer (model.linear's ``form``): gradsweep's kernel on the CPU
    where this machine's compiler builds it, else ``bmm`` + bias."""
    if device.type == "cpu":
        from gradsweep.engine.kernels.build import available

        if available():
            return "kernel"
    return "bmm"


def _how(device: torch.device, dtype: torch.dtype, form: str) -> dict[str, Any]:
    """torch.compile's mode or options for a program on ``device``."""
    if device.type == "cuda":
        return {"mode": "reduce-overhead"}  # CUDA graphs (cudagraph trees)
    if dtype != torch.float32 or form != "bmm":
        return {}  # no GEMM left for inductor (the kernel), or none it has a CPU template for (float64)
    # Autotuning picks inductor's GEMM template where it beats ATen's bmm.
    return {"mode": "max-autotune-no-cudagraphs"}


def _prepare_inductor() -> None:
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
    import torch._dynamo

    # Private module, documented setting (torch.compile's troubleshooting guide): no public API raises the number of
    # programs one function may compile; renamed across versions (cache_size_limit before recompile_limit).
    dynamo_config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name) and getattr(dynamo_config, name) < RECOMPILE_LIMIT:
            setattr(dynamo_config, name, RECOMPILE_LIMIT)


@dataclass(frozen=True)
class Shape:
    """Everything a compiled program is specialised on."""

    model: ModelCfg
    loss: str
    optim: str
    momentum: bool
    weight_decay: bool
    stats: bool
    dtype: torch.dtype
    device: torch.device


_PROGRAMS: dict[tuple, tuple[Callable, Callable]] = {}


def programs(shape: Shape, layout: ParamMap, compiled: bool = True) -> tuple[Callable, Callable]:
    """The (forward, update) pair for ``shape`` and parameter ``layout``, made once per process. ``compiled``: each
    is compiled for its first call's argument shapes (the stack size and batch among them), or loaded where an
    earlier process compiled it (:mod:`gradsweep.engine.programs`); else the same Python functions, run op by op (the eager
    engine on the CPU)."""
    form = linear_form(shape.device)
    key = (dataclasses.astuple(shape.model), *dataclasses.astuple(shape)[1:], layout, form, compiled)
    if key not in _PROGRAMS:
        fwd, upd = _make(shape, layout, form)
        if compiled:
            _prepare_inductor()
            how = _how(shape.device, shape.dtype, form)
            what = repr((shape, layout, form))
            fwd, upd = (Program(fwd, "forward", what, how, shape.device),
                        Program(upd, "update", what, how, shape.device))
        _PROGRAMS[key] = (fwd, upd)
    return _PROGRAMS[key]


def _make(shape: Shape, layout: ParamMap, form: str) -> tuple[Callable, Callable]:
    """The step's two functions for torch.compile: the forward (loss and the forward's statistics) and the update
    after autograd (screen, clip, optimiser, the statistics)."""
    cfg, names = shape.model, layout.names
    rows = layers(cfg)
    plan = StatsPlan(layout, rows, cfg.activation, shape.dtype, shape.device) if shape.stats else None
    # With gradsweep's kernel (the CPU) the statistics are taken in its passes where it can: each Linear output's
    # moments in the forward kernel, |dL/dh| in the backward one, the per-weight sums in one pass of layer_sums.
    in_kernel = shape.stats and form == "kernel"
    # Which hidden blocks' activation input is a Linear output (no norm layer between), whose moments it has.
    block_rows = list(range(cfg.depth)) if in_kernel and cfg.norm == "none" else []
    keep_inputs = cfg.activation in RELU_FAMILY and cfg.activation != "relu" and not block_rows
    hidden_width = layout.shapes[names.index("linear1.weight")][0] if cfg.depth else 0
    reduce_forward = _reduce_forward(cfg.activation, block_rows)
    fwd = _forward(shape, names, plan, form, in_kernel, keep_inputs, reduce_forward)
    stats = _stats(cfg, rows, plan, form, hidden_width, reduce_forward)
    return fwd, _update(shape, stats)


def _reduce_forward(activation: str, block_rows: list[int]) -> Callable:
    def reduce_forward(outputs: list[torch.Tensor], acts: list[torch.Tensor], act_inputs: list[torch.Tensor],
                       moments: dict[int, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The statistics' reductions of the forward pass: each layer output's norm (R, L), and per hidden block
        (as the eager probe takes them: stacking the blocks first costs a copy of each) what the activation has;
        from the kernel's ``moments`` of layer output k where it took them."""
        red = {"out_norm": torch.stack([out_norm(h, moments.get(k)) for k, h in enumerate(outputs)], dim=1)}
        if acts:
            blocks = [block_terms(activation, z, act_inputs[k] if act_inputs else None,
                                  moments[k] if k in block_rows else None) for k, z in enumerate(acts)]
            for name, col in zip(("act_norm", "saturated", "pos_sum"), zip(*blocks)):
                if col[0] is not None:
                    red[name] = torch.stack(col, dim=1)
        return red

    return reduce_forward


def _forward(shape: Shape, names: list[str], plan: Any, form: str, in_kernel: bool, keep_inputs: bool,
             reduce_forward: Callable) -> Callable:
    cfg = shape.model

    def fwd(plist: list[torch.Tensor], tokens: list[torch.Tensor], xb: torch.Tensor, yb: torch.Tensor):
        moments: dict[int, torch.Tensor] = {}

        def tap(k: int, h: torch.Tensor) -> torch.Tensor:  # the backward returns |dL/dh| per run as d/d(token)
            return GradNorm.apply(h, tokens[k], plan.small, plan.scale)

        def tapped_linear(k: int, a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            from gradsweep.engine.kernels.stacked import linear_stats  # d/d(token): the sums of |dL/dh|'s two norms

            h, moments[k] = linear_stats(a, weight, bias, tokens[k], plan.scale)
            return h

        f = forward(dict(zip(names, plist)), cfg, xb, tap=tap if shape.stats else None, linear_form=form,
                    tapped_linear=tapped_linear if in_kernel else None)
        loss = per_run_loss(shape.loss, f.out, yb)
        if not shape.stats:
            return loss, {}
        # Detached: outputs nothing differentiates, for which autograd would otherwise fill zero gradients.
        seen = (f.outputs, f.acts, f.act_inputs if keep_inputs else [])
        if form == "bmm":
            # The tensors themselves (autograd keeps them for the backward pass anyway), reduced in the update
            # program: here inductor would fuse the reductions into its GEMM template's epilogue and fail an
            # assertion (torch 2.13; with epilogue fusion off the forward loses more than the reductions cost).
            return loss, {"seen": [t.detach() for t in (*seen[0], *seen[1], *seen[2])]}
        # Reduced here, where each tensor is made (and still in cache), fused with the op that makes it.
        return loss, {k: v.detach() for k, v in reduce_forward(*seen, moments).items()}

    return fwd


def _stats(cfg: ModelCfg, rows: list, plan: Any, form: str, hidden_width: int, reduce_forward: Callable) -> Callable:
    def stats(grad: torch.Tensor, u: torch.Tensor, flat: torch.Tensor, alive: torch.Tensor,
              hgrad: list[torch.Tensor], fwd_stats: dict[str, Any], batch: int) -> torch.Tensor:
        """The eager StatsPlan's statistics (its own reductions and assembly) from the step's tensors."""
        if "seen" in fwd_stats:
            seen = fwd_stats["seen"]
            n_out, n_act = len(rows), cfg.depth
            fwd_stats = reduce_forward(seen[:n_out], seen[n_out:n_out + n_act], seen[n_out + n_act:], {})
        # A Linear output's token (R, 2) got the two sums of (dL/dh)^2 (stacked_linear_stats), a norm's its norm.
        hgrad = [pick_norm(torch.sqrt(t[:, 0]), torch.sqrt(t[:, 1]), plan.small, plan.scale) if t.dim() == 2 else t
                 for t in hgrad]
        if form == "kernel":
            from gradsweep.engine.kernels.stacked import sums as layer_sums

            sums, gmax = layer_sums(grad, u, flat, plan.offsets, plan.numels, plan.scale)
        else:
            absg, terms = plan.terms(grad, u)
            sums = torch.stack([plan.per_weight(t, torch.sum) for t in (*terms, flat * flat)])
            gmax = plan.per_weight(absg, torch.amax)
        return plan.finish(sums, gmax, alive, torch.stack(hgrad, dim=1),
                           fwd_stats["out_norm"], batch, fwd_stats.get("act_norm"), hidden_width,
                           fwd_stats.get("saturated"), fwd_stats.get("pos_sum"))

    return stats


def _update(shape: Shape, stats: Callable) -> Callable:
    def upd(flat: torch.Tensor, gparams: list[torch.Tensor], hgrad: list[torch.Tensor], loss: torch.Tensor,
            fwd_stats: dict[str, Any], batch: int, state: list[torch.Tensor], hyper: dict[str, torch.Tensor],
            alive: torch.Tensor, diverged: torch.Tensor, reason: torch.Tensor, step: torch.Tensor):
        """The eager loop's step after autograd (train.train_group), on the (R, P) matrices; returns the new
        parameters, state and bookkeeping, and the step's (R, 3) scalars and (R, L, S) statistics."""
        grad, total, alive, diverged, reason = screen(gparams, loss, alive, diverged, reason, step)
        clipped_grad, clipped = clip(grad, total, hyper["max_norm"])
        if shape.optim == "sgd":
            u, buf = sgd_update(flat, clipped_grad, state[0] if shape.momentum else None, alive, hyper["lr"],
                                hyper["momentum"], hyper["weight_decay"], shape.weight_decay)
            state = [buf] if shape.momentum else []
        else:
            u, m, v = adam_update(flat, clipped_grad, state[0], state[1], alive, step + 1, hyper["lr"], hyper["beta1"],
                                  hyper["beta2"], hyper["eps"], hyper["weight_decay"], shape.weight_decay)
            state = [m, v]
        scalars = torch.stack([loss, total, clipped.to(flat.dtype)], dim=1)
        lay = stats(grad, u, flat, alive, hgrad, fwd_stats, batch) if shape.stats else None
        return flat + u, state, alive, diverged, reason, scalars, lay

    return upd


def runs_programs(engine: str, device: torch.device) -> bool:
    """Whether a group on ``engine`` trains through the step programs (:class:`Step`): always when compiled; eager
    on the CPU wherever gradsweep's kernel is built (the programs run op by op: the kernel's Linear and its
    in-kernel statistics beat the ``baddbmm`` loop, BENCHMARKS.md). Eager on CUDA,
    or on a CPU without a C++ compiler, is the loop of :mod:`gradsweep.engine.train` (``baddbmm``, statistics through a
    probe and hooks)."""
    return engine == "compiled" or (device.type == "cpu" and linear_form(device) == "kernel")


class Step:
    """One group's training state on the step programs: call it once per step.

    ``compiled``: the programs compiled, with every statistic taken on every step (one program serves all steps);
    else run op by op, with the statistics only on the steps that log them (``stats_now``)."""

    def __init__(self, shape: Shape, layout: ParamMap, params: list[torch.Tensor], opt: StackedOptimizer,
                 max_norm: torch.Tensor, compiled: bool = True):
        """``opt``: the group's eager optimiser, whose per-run settings and zeroed state the programs take over."""
        self.shape, self.flat, self.params, self.compiled = shape, opt.flat, params, compiled
        self.pairs = {shape.stats: programs(shape, layout, compiled)}
        if shape.stats and not compiled:
            self.pairs[False] = programs(dataclasses.replace(shape, stats=False), layout, compiled)
        self.hyper = {"lr": opt.lr, "weight_decay": opt.weight_decay, "max_norm": max_norm}
        if shape.optim == "sgd":
            self.hyper["momentum"] = opt.momentum
            self.state = [opt.buf] if shape.momentum else []
        else:
            self.hyper.update(beta1=opt.beta1, beta2=opt.beta2, eps=opt.eps)
            self.state = [opt.exp_avg, opt.exp_avg_sq]
        R = self.flat.shape[0]
        # One zero per layer output whose "gradient" is |dL/d(output)|: (R,) the norm (stats.GradNorm), or (R, 2)
        # the sums it is taken from, for a Linear output through the kernel (stacked.stacked_linear_stats).
        kernel = linear_form(shape.device) == "kernel"
        self.tokens = [torch.zeros((R, 2) if kernel and row.kind == "linear" else (R,), dtype=self.flat.dtype,
                                   device=self.flat.device, requires_grad=True)
                       for row in layers(shape.model)] if shape.stats else []
        self.step_t = torch.zeros((), dtype=torch.long, device=self.flat.device)

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor, alive: torch.Tensor, diverged: torch.Tensor,
                 reason: torch.Tensor, stats_now: bool = True) -> tuple[Any, ...]:
        stats = self.shape.stats and (stats_now or self.compiled)
        fwd, upd = self.pairs[stats]
        tokens = self.tokens if stats else []
        if self.shape.device.type == "cuda" and self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # this step's graph outputs feed the next step's inputs
        loss, fwd_stats = fwd(self.params, tokens, xb, yb)
        grads = torch.autograd.grad(loss.sum(), [*self.params, *tokens])
        n = len(self.params)
        with torch.no_grad():
            new_flat, self.state, alive, diverged, reason, scalars, lay = upd(
                self.flat, list(grads[:n]), list(grads[n:]), loss.detach(), fwd_stats, xb.shape[1],
                self.state, self.hyper, alive, diverged, reason, self.step_t)
            self.flat.copy_(new_flat)  # the parameter views see the update
            self.step_t += 1
        if self.shape.device.type == "cuda" and self.compiled:  # a CUDA graph's outputs are overwritten by its next replay
            self.state = [t.clone() for t in self.state]
            alive, diverged, reason = alive.clone(), diverged.clone(), reason.clone()
            scalars, lay = scalars.clone(), (lay.clone() if lay is not None else None)
        return alive, diverged, reason, scalars, lay
