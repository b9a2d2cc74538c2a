"""Gradient clipping and optimisers for stacked runs, each run with its own hyperparameters.

Semantics follow ``torch.nn.utils.clip_grad_norm_``, ``torch.optim.SGD`` (no dampening, no Nesterov)
and ``torch.optim.Adam`` (L2 weight decay, no AMSGrad), applied to every run independently. They act
on the (R, P) parameter matrix of a :class:`gradsweep.engine.mlp.Stack`: a handful of tensor ops per step
whatever the depth. A run that is not ``alive`` keeps its parameters and optimiser state unchanged,
so a diverged run cannot touch anything, its own state included.
"""

from __future__ import annotations

import math

import torch

from gradsweep.config.sections import OptimCfg

CLIP_EPS = 1e-6  # clip_grad_norm_'s: coef = max_norm / (total_norm + 1e-6)


def clip(grad: torch.Tensor, total_norm: torch.Tensor, max_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale each run's gradient row by min(1, max_norm / (total_norm + 1e-6)); max_norm = inf: no clipping.

    Returns the scaled (R, P) gradient and, per run, whether the scale was below 1 (clipping acted).
    """
    coef = torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)
    return grad * coef.unsqueeze(1), coef < 1


def screen(grads: list[torch.Tensor] | tuple[torch.Tensor, ...], loss: torch.Tensor, alive: torch.Tensor,
           diverged: torch.Tensor, reason: torch.Tensor, step: int | torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A step's gradients as one (R, P) matrix (clipping, the optimiser and the statistics act on it whole), its
    per-run norm, and the divergence bookkeeping: a run alive until now whose loss or gradient norm is not finite
    stops at ``step``, with reason 1 (loss) or 2 (gradient), as indices of ``train.DIVERGED_REASONS``.

    Returns (grad, total norm, alive, diverged, reason); both engines call it.
    """
    grad = torch.cat([g.reshape(g.shape[0], -1) for g in grads], dim=1)  # (R,) too: a 0-d parameter, stacked
    total = torch.linalg.vector_norm(grad, dim=1)
    ok = torch.isfinite(loss) & torch.isfinite(total)
    bad = alive & ~ok
    diverged = torch.where(bad, step, diverged)
    reason = torch.where(bad, torch.where(torch.isfinite(loss), 2, 1), reason)
    return grad, total, alive & ok, diverged, reason


def clip_vector(clip_norms: list[float | None], like: torch.Tensor) -> torch.Tensor:
    """Per-run max_norm as a (R,) tensor; no clipping is +inf."""
    return torch.tensor([math.inf if c is None else c for c in clip_norms], dtype=like.dtype, device=like.device)


class StackedOptimizer:
    """SGD or Adam over a (R, P) parameter matrix, with per-run lr, momentum, betas, eps, weight decay."""

    def __init__(self, flat: torch.Tensor, cfgs: list[OptimCfg]):
        names = {c.name for c in cfgs}
        if len(names) != 1:
            raise ValueError(f"optim.name must be the same for every run of a group; got {sorted(names)}")
        self.name = names.pop()
        self.flat = flat

        def col(attr: str) -> torch.Tensor:  # (R, 1): broadcasts over the flat axis
            return torch.tensor([[getattr(c, attr)] for c in cfgs], dtype=flat.dtype, device=flat.device)

        self.lr, self.weight_decay = col("lr"), col("weight_decay")
        self.use_wd = any(c.weight_decay != 0 for c in cfgs)
        self.t = 0
        if self.name == "sgd":
            self.momentum = col("momentum")
            self.buf = torch.zeros_like(flat) if any(c.momentum != 0 for c in cfgs) else None
        else:
            self.beta1, self.beta2, self.eps = col("beta1"), col("beta2"), col("eps")
            self.exp_avg = torch.zeros_like(flat)
            self.exp_avg_sq = torch.zeros_like(flat)

    @torch.no_grad()
    def step(self, grad: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
        """Update the alive runs' parameters in place; return the applied (R, P) update (zero where not alive)."""
        self.t += 1
        if self.name == "sgd":
            u, self.buf = sgd_update(self.flat, grad, self.buf, alive, self.lr, self.momentum, self.weight_decay,
                                     self.use_wd)
        else:
            u, self.exp_avg, self.exp_avg_sq = adam_update(
                self.flat, grad, self.exp_avg, self.exp_avg_sq, alive, self.t, self.lr, self.beta1, self.beta2, self.eps,
                self.weight_decay, self.use_wd)
        self.flat.add_(u)
        return u


# The update rules as pure functions of tensors (and the step count t, a Python int or a tensor): the eager
# optimiser above and the compiled engine (gradsweep.engine.compiled) both apply exactly these.

def sgd_update(flat: torch.Tensor, grad: torch.Tensor, buf: torch.Tensor | None, alive: torch.Tensor,
               lr: torch.Tensor, momentum: torch.Tensor, weight_decay: torch.Tensor, use_wd: bool,
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(update, new momentum buffer) of torch.optim.SGD for each run; zero update and unchanged buffer where not alive."""
    keep = alive.unsqueeze(1)
    g = grad + weight_decay * flat if use_wd else grad
    if buf is not None:
        # First step: buf = 0 * m + g = g exactly, as torch.optim.SGD's clone of the gradient.
        new = buf * momentum + g
        buf = torch.where(keep, new, buf)
        g = new
    u = -lr * g
    return torch.where(keep, u, torch.zeros((), dtype=u.dtype, device=u.device)), buf


def adam_update(flat: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                alive: torch.Tensor, t: int | torch.Tensor, lr: torch.Tensor, beta1: torch.Tensor, beta2: torch.Tensor,
                eps: torch.Tensor, weight_decay: torch.Tensor, use_wd: bool,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(update, new exp_avg, new exp_avg_sq) of torch.optim.Adam's step ``t`` (1-based) for each run."""
    keep = alive.unsqueeze(1)
    g = grad + weight_decay * flat if use_wd else grad
    m = torch.lerp(exp_avg, g, 1 - beta1)
    v = exp_avg_sq * beta2 + (1 - beta2) * g * g
    bc1 = 1 - beta1**t
    bc2_sqrt = torch.sqrt(1 - beta2**t)
    u = -(lr / bc1) * (m / (torch.sqrt(v) / bc2_sqrt + eps))
    u = torch.where(keep, u, torch.zeros((), dtype=u.dtype, device=u.device))
    return u, torch.where(keep, m, exp_avg), torch.where(keep, v, exp_avg_sq)
