"""gradsweep.engine.optim against torch.optim and torch.nn.utils.clip_grad_norm_, every option, in float64.

Each run of a stack is one row of the (R, P) matrix; its row must follow what torch.optim does to one tensor fed the
same gradients. One kernel path per side and float64: agreement to 1e-12.
"""

from __future__ import annotations

import math

import pytest
import torch

from gradsweep.config.sections import OptimCfg
from gradsweep.engine.optim import StackedOptimizer, clip, clip_vector

P, STEPS = 7, 6

SGD = [OptimCfg(name="sgd", lr=0.1), OptimCfg(name="sgd", lr=0.03, momentum=0.9),
       OptimCfg(name="sgd", lr=0.5, weight_decay=0.01), OptimCfg(name="sgd", lr=0.2, momentum=0.5, weight_decay=0.1)]
ADAM = [OptimCfg(name="adam", lr=0.01), OptimCfg(name="adam", lr=0.1, beta1=0.5, beta2=0.9),
        OptimCfg(name="adam", lr=0.003, eps=1e-3), OptimCfg(name="adam", lr=0.05, weight_decay=0.01, beta1=0.0)]


def reference(cfg: OptimCfg, start: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    p = torch.nn.Parameter(start.clone())
    if cfg.name == "sgd":
        opt = torch.optim.SGD([p], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.Adam([p], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


def stacked(cfgs: list[OptimCfg], seed: int):
    """Random float64 starting parameters (R, P), STEPS random gradients, and a StackedOptimizer over a copy."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randn(len(cfgs), P, generator=g, dtype=torch.float64)
    grads = [torch.randn(len(cfgs), P, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    flat = start.clone()
    return start, grads, flat, StackedOptimizer(flat, cfgs)


@pytest.mark.parametrize("cfgs", [SGD, ADAM], ids=["sgd", "adam"])
def test_each_run_follows_torch_optim(cfgs):
    start, grads, flat, opt = stacked(cfgs, seed=0)
    alive = torch.ones(len(cfgs), dtype=torch.bool)
    for grad in grads:
        before = flat.clone()
        update = opt.step(grad, alive)
        assert torch.equal(flat, before + update)  # the update returned is the one applied
    for r, cfg in enumerate(cfgs):
        want = reference(cfg, start[r], [grad[r] for grad in grads])
        torch.testing.assert_close(flat[r], want, rtol=1e-12, atol=1e-15, msg=f"run {r}: {cfg}")


@pytest.mark.parametrize("cfgs", [SGD, ADAM], ids=["sgd", "adam"])
def test_a_run_that_is_not_alive_keeps_everything(cfgs):
    """A diverged run's parameters and optimiser state stay as they were; the others train as if it were not there."""
    start, grads, flat, opt = stacked(cfgs, seed=1)
    alive = torch.tensor([True, False] + [True] * (len(cfgs) - 2))
    for grad in grads:
        update = opt.step(grad, alive)
        assert torch.equal(update[1], torch.zeros(P, dtype=torch.float64))
    assert torch.equal(flat[1], start[1])
    want = reference(cfgs[0], start[0], [grad[0] for grad in grads])
    torch.testing.assert_close(flat[0], want, rtol=1e-12, atol=1e-15)


def test_one_optimiser_per_group():
    with pytest.raises(ValueError, match="optim.name"):
        StackedOptimizer(torch.zeros(2, 3), [OptimCfg(name="sgd"), OptimCfg(name="adam")])


@pytest.mark.parametrize("max_norm", [None, 0.0, 0.5, 3.0, 1e6])
def test_clip_is_clip_grad_norm(max_norm):
    g = torch.Generator().manual_seed(2)
    grads = torch.randn(3, P, generator=g, dtype=torch.float64) * torch.tensor([[0.1], [1.0], [10.0]], dtype=torch.float64)
    total = torch.linalg.vector_norm(grads, dim=1)
    clipped, acted = clip(grads, total, clip_vector([max_norm] * 3, grads))
    for r in range(3):
        p = torch.nn.Parameter(torch.zeros(P, dtype=torch.float64))
        p.grad = grads[r].clone()
        norm = torch.nn.utils.clip_grad_norm_([p], math.inf if max_norm is None else max_norm)
        torch.testing.assert_close(norm, total[r], rtol=1e-15, atol=0)
        torch.testing.assert_close(clipped[r], p.grad, rtol=1e-15, atol=0)
        assert bool(acted[r]) == (max_norm is not None and max_norm / (float(total[r]) + 1e-6) < 1)
