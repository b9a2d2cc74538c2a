"""Sharpness (gradsweep.engine.curvature) against the full Hessian's top eigenvalue, in float64."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_cfg
from test_modules import cfg as module_cfg
from test_modules import nets  # noqa: F401 - the fixture

from gradsweep.engine import curvature
from gradsweep.engine.data import load_data
from gradsweep.engine.losses import per_run_loss
from gradsweep.engine.mlp import build_params, forward
from gradsweep.engine.train import initial_sharpness

RTOL = 1e-4  # the bound; power iteration stops at curvature.SHARPNESS_TOL = 1e-5 relative change

INITS = {"default": {}, "xavier": {"name": "xavier", "scheme": "xavier"},
         "kaiming": {"name": "kaiming", "scheme": "kaiming", "nonlinearity": "relu"}}


def full_hessian_top(cfg) -> float:
    """The largest eigenvalue of the run's training loss Hessian, by torch.autograd.functional.hessian and eigvalsh."""
    data = load_data(cfg.data)
    x, y = data.x.double(), data.y.double()
    stack = build_params(cfg.model, [cfg.init], [cfg.train.seed], x.shape[1], data.out_dim, torch.float64, "cpu")
    names, shapes = stack.layout.names, stack.layout.shapes
    theta = stack.flat[0].detach().clone()

    def loss(flat: torch.Tensor) -> torch.Tensor:
        params, at = {}, 0
        for name, shape in zip(names, shapes):
            n = math.prod(shape)
            params[name] = flat[at:at + n].view(1, *shape)
            at += n
        return per_run_loss(cfg.loss, forward(params, cfg.model, x.unsqueeze(0)).out, y.unsqueeze(0))[0]

    h = torch.autograd.functional.hessian(loss, theta, vectorize=True)
    return float(torch.linalg.eigvalsh(h).max())


@pytest.mark.parametrize("depth", [3, 10])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("init", list(INITS))
def test_sharpness_is_the_full_hessians_top_eigenvalue(depth, activation, init):
    cfg = make_cfg(model={"depth": depth, "activation": activation}, init=INITS[init], train={"dtype": "float64"})
    s = initial_sharpness([cfg])
    want = full_hessian_top(cfg)
    assert bool(s.converged[0]), int(s.iters[0])
    assert float(s.value[0]) == pytest.approx(want, rel=RTOL)


def test_a_fused_group_of_100_equals_each_run_alone():
    inits = list(INITS.values())
    cfgs = [make_cfg(model={"depth": 4, "activation": "tanh"}, init=inits[r % 3], train={"seed": r, "dtype": "float64"},
                     optim={"lr": 0.01 * (1 + r % 5)}) for r in range(100)]
    group = initial_sharpness(cfgs)
    assert bool(group.converged.all())
    # the products are block-diagonal and each run's start vector is the same: a run's iterates do not depend on
    # its group, up to the batched matrix products' rounding (float64)
    for r in (0, 1, 2, 37, 99):
        alone = initial_sharpness([cfgs[r]])
        assert float(group.value[r]) == pytest.approx(float(alone.value[0]), rel=1e-9)
        assert float(group.value[r]) == pytest.approx(full_hessian_top(cfgs[r]), rel=RTOL)


def test_a_custom_resmlp_with_layernorm(nets):  # noqa: F811 - the fixture
    run = module_cfg({"_target_": "usernets.ResMLP", "width": 6, "depth": 2})
    s = initial_sharpness([run])
    net_params = _module_params(run)
    names = list(net_params)
    flat = torch.cat([p.reshape(-1) for p in net_params.values()])
    import usernets

    torch.manual_seed(run.train.seed)
    base = usernets.ResMLP(1, 1, width=6, depth=2).double()
    data = load_data(run.data)
    x, y = data.x.double(), data.y.double()

    def loss(theta: torch.Tensor) -> torch.Tensor:
        params, at = {}, 0
        for name in names:
            n = net_params[name].numel()
            params[name] = theta[at:at + n].view_as(net_params[name])
            at += n
        out = torch.func.functional_call(base, params, (x,))
        return (out - y).square().mean()

    want = float(torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat, vectorize=True)).max())
    assert float(s.value[0]) == pytest.approx(want, rel=RTOL)


def _module_params(run) -> dict[str, torch.Tensor]:
    """The run's initial parameters as gradsweep built them (its stack's first row), by name."""
    from gradsweep.engine import train

    g = train._plan([run])
    data = load_data(run.data)
    x = g.on_device(data.x)
    net = train._build(g, x.shape[1], data.out_dim, False, x)
    names = [n for n in dict(net.step.base.named_parameters())]
    return {n: p[0].detach() for n, p in zip(names, net.params)}


def test_a_negative_dominant_eigenvalue_is_shifted_past():
    """A quadratic whose most negative eigenvalue is larger in magnitude than its top one: the value is the top."""
    eig = torch.tensor([[-5.0, 1.0, 0.5, 2.0], [-0.1, 3.0, 0.2, 0.3]], dtype=torch.float64)
    w = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    s = curvature.sharpness(lambda: 0.5 * (eig * (w + 1).square()).sum(dim=1), [w])
    assert s.value.tolist() == pytest.approx([2.0, 3.0], rel=1e-6)
    assert bool(s.converged.all())


def test_non_finite_losses_give_nan_and_no_second_derivative_says_why():
    w = torch.ones(3, 2, dtype=torch.float64, requires_grad=True)
    s = curvature.sharpness(lambda: (w.square().sum(dim=1) * torch.tensor([1.0, float("nan"), 2.0],
                                                                              dtype=torch.float64)), [w])
    assert s.value[0].item() == pytest.approx(2.0) and math.isnan(s.value[1].item())
    assert s.value[2].item() == pytest.approx(4.0)
    linear = curvature.sharpness(lambda: (w * 3).sum(dim=1), [w])
    assert torch.isnan(linear.value).all() and linear.error
