"""Gradient clipping and optimisers for stacked runs, each run with its own hyperparameters.

Semantics follow ``torch.nn.utils.clip_grad_norm_``, ``torch.optim.SGD`` (no dampening, no Nesterov)
and ``torch.optim.Adam`` (L2 weight decay, no AMSGrad), applied to every run independently. Every
per-run hyperparameter is a tensor of shape (R,). A run that is not ``alive`` keeps its parameters
and optimiser state unchanged, so a diverged run cannot touch anything, its own state included.
"""

from __future__ import annotations

import math

import torch

from gradsweep.config import OptimCfg

CLIP_EPS = 1e-6  # clip_grad_norm_'s: coef = max_norm / (total_norm + 1e-6)


def per_run(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """View a (R,) vector so that it broadcasts over a (R, ...) tensor."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def run_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Per-run L2 norm over all the given (R, ...) tensors together, as clip_grad_norm_ computes it
    (the norm of the per-tensor norms)."""
    norms = torch.stack([torch.linalg.vector_norm(t.flatten(1), dim=1) for t in tensors], dim=1)
    return torch.linalg.vector_norm(norms, dim=1)


def clip(grads: list[torch.Tensor], total_norm: torch.Tensor, max_norm: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Scale each run's gradients by min(1, max_norm / (total_norm + 1e-6)); max_norm = inf: no clipping.

    Returns the scaled gradients and, per run, whether the scale was below 1 (clipping acted).
    """
    coef = torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)
    return [g * per_run(coef, g) for g in grads], coef < 1


class StackedOptimizer:
    """SGD or Adam over stacked parameters, with per-run lr, momentum, betas, eps, weight decay."""

    def __init__(self, params: list[torch.Tensor], cfgs: list[OptimCfg]):
        names = {c.name for c in cfgs}
        if len(names) != 1:
            raise ValueError(f"optim.name must be the same for every run of a group; got {sorted(names)}")
        self.name = names.pop()
        self.params = params
        like = params[0]

        def vec(attr: str) -> torch.Tensor:
            return torch.tensor([getattr(c, attr) for c in cfgs], dtype=like.dtype, device=like.device)

        self.lr, self.weight_decay = vec("lr"), vec("weight_decay")
        self.use_wd = any(c.weight_decay != 0 for c in cfgs)
        self.t = 0
        if self.name == "sgd":
            self.momentum = vec("momentum")
            self.use_momentum = any(c.momentum != 0 for c in cfgs)
            self.buf = [torch.zeros_like(p) for p in params] if self.use_momentum else None
        else:
            self.beta1, self.beta2, self.eps = vec("beta1"), vec("beta2"), vec("eps")
            self.exp_avg = [torch.zeros_like(p) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], alive: torch.Tensor) -> list[torch.Tensor]:
        """Update the parameters of the alive runs in place; return the applied updates (zero where not alive)."""
        self.t += 1
        updates = []
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            keep = per_run(alive, p)
            if self.use_wd:
                g = g + per_run(self.weight_decay, p) * p
            if self.name == "sgd":
                if self.use_momentum:
                    # First step: buf = 0 * m + g = g exactly, as torch.optim.SGD's clone.
                    buf = self.buf[i] * per_run(self.momentum, p) + g
                    self.buf[i] = torch.where(keep, buf, self.buf[i])
                    g = buf
                u = -per_run(self.lr, p) * g
            else:
                m = torch.lerp(self.exp_avg[i], g, per_run(1 - self.beta1, p))
                v = self.exp_avg_sq[i] * per_run(self.beta2, p) + per_run(1 - self.beta2, p) * g * g
                self.exp_avg[i] = torch.where(keep, m, self.exp_avg[i])
                self.exp_avg_sq[i] = torch.where(keep, v, self.exp_avg_sq[i])
                bc1 = 1 - self.beta1**self.t
                bc2_sqrt = torch.sqrt(1 - self.beta2**self.t)
                denom = torch.sqrt(v) / per_run(bc2_sqrt, p) + per_run(self.eps, p)
                u = -per_run(self.lr / bc1, p) * (m / denom)
            u = torch.where(keep, u, torch.zeros((), dtype=u.dtype, device=u.device))
            p.add_(u)
            updates.append(u)
        return updates


def clip_vector(cfgs_clip: list[float | None], like: torch.Tensor) -> torch.Tensor:
    """Per-run max_norm as a (R,) tensor; no clipping is +inf."""
    return torch.tensor([math.inf if c is None else c for c in cfgs_clip], dtype=like.dtype, device=like.device)
