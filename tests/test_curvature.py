"""Sharpness (gradsweep.engine.curvature) against the full Hessian's top eigenvalue, in float64."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cfg
from test_modules import cfg as module_cfg
from test_modules import nets  # noqa: F401 - the fixture

from gradsweep import load_sweep
from gradsweep.engine import curvature
from gradsweep.engine.data import load_data
from gradsweep.engine.losses import per_run_loss
from gradsweep.engine.mlp import build_params, forward
from gradsweep.engine.train import initial_sharpness, train_group
from gradsweep.results.edge import phases
from gradsweep.results.store import write_tables
from gradsweep.results.tables import build_tables

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


# --- through training: the schedule, the columns, and what a user reads from them ---------------------------------

def test_training_measures_at_step_0_every_n_logged_steps_and_after_the_last(tmp_path):
    cfgs = [make_cfg(model={"depth": 3, "activation": "tanh"}, optim={"lr": lr},
                     train={"steps": 25, "log_every": 2, "dtype": "float64"}, stats={"sharpness_every": 4})
            for lr in (0.01, 0.05)]
    trace = train_group(cfgs)
    measured = np.isfinite(trace.sharpness).all(axis=1)
    assert trace.steps[measured].tolist() == [0, 8, 16, 24]  # logged steps 0, 2, 4, ..., 24: every 4th of them
    start = initial_sharpness(cfgs)
    assert trace.sharpness[0].tolist() == pytest.approx(start.value.tolist(), rel=1e-12)
    runs, steps = build_tables(cfgs, trace)
    assert runs["sharpness_init"].tolist() == pytest.approx(start.value.tolist(), rel=1e-12)
    assert runs["sharpness_final"].notna().all() and runs["sharpness_converged"].all()
    at = steps.dropna(subset=["sharpness"])
    assert sorted(set(at["step"])) == [0, 8, 16, 24] and steps.loc[steps.step == 2, "sharpness"].isna().all()
    # the tables written and read back keep the columns
    write_tables(tmp_path, runs, steps)
    back, back_steps = load_sweep(tmp_path)
    assert back["sharpness_init"].tolist() == runs["sharpness_init"].tolist()
    assert back_steps["sharpness"].notna().sum() == at["sharpness"].notna().sum()


@pytest.mark.parametrize("engine", ["eager", "compiled"])
def test_measuring_changes_no_number_of_the_training(engine):
    base = {"model": {"depth": 3, "activation": "tanh"}, "train": {"steps": 30}, "engine": engine}
    on = [make_cfg(**base, optim={"lr": lr}, stats={"sharpness_every": 3}) for lr in (0.02, 0.3)]
    off = [make_cfg(**base, optim={"lr": lr}, stats={"sharpness": False}) for lr in (0.02, 0.3)]
    a, b = train_group(on), train_group(off)
    assert np.array_equal(a.loss, b.loss, equal_nan=True) and np.array_equal(a.layer, b.layer, equal_nan=True)
    assert b.sharpness is None and np.isfinite(a.sharpness[3]).all()
    runs, _ = build_tables(off, b)
    assert runs["sharpness_init"].isna().all() and runs["lr_edge_pred"].isna().all()


def test_measuring_a_module_restores_its_random_streams(nets):  # noqa: F811 - the fixture
    """Dropout draws from each run's stream; the measurement's own forward passes must not use up its draws."""
    on = [module_cfg({"_target_": "usernets.Dropped"}, train={"seed": s, "steps": 12}, stats={"sharpness_every": 2})
          for s in range(2)]
    off = [module_cfg({"_target_": "usernets.Dropped"}, train={"seed": s, "steps": 12}, stats={"sharpness": False})
           for s in range(2)]
    a, b = train_group(on), train_group(off)
    assert np.array_equal(a.loss, b.loss) and np.isfinite(a.sharpness[2]).all()


@pytest.mark.parametrize(("momentum", "weight_decay"), [(0.0, 0.0), (0.9, 0.0), (0.0, 0.5)])
def test_the_predicted_edge_is_gradient_descents_on_a_quadratic(nets, momentum, weight_decay):  # noqa: F811
    """A lone Linear layer under MSE is a quadratic in its parameters: full-batch GD (heavy ball) converges below
    lr_edge_pred and diverges above it, 5% either side."""
    net = {"_target_": "usernets.Scaled"}
    probe = module_cfg(net, optim={"momentum": momentum, "weight_decay": weight_decay})
    runs, _ = build_tables([probe], train_group([probe]))
    edge = float(runs["lr_edge_pred"][0])
    lam = float(runs["sharpness_init"][0])
    assert edge == pytest.approx(2 * (1 + momentum) / (lam + weight_decay), rel=1e-12)
    cfgs = [module_cfg(net, optim={"lr": f * edge, "momentum": momentum, "weight_decay": weight_decay},
                       train={"steps": 600}) for f in (0.95, 1.05)]
    runs, _ = build_tables(cfgs, train_group(cfgs))
    assert runs["lr_over_edge"].tolist() == pytest.approx([0.95, 1.05], rel=1e-9)
    below, above = runs.iloc[0], runs.iloc[1]
    assert below["final_loss"] < below["initial_loss"] and above["final_loss"] > 1e3 * above["initial_loss"]


def test_adam_has_no_edge_and_says_why():
    run = make_cfg(model={"depth": 2}, optim={"name": "adam", "lr": 1e-3}, train={"steps": 3})
    runs, _ = build_tables([run], train_group([run]))
    assert np.isfinite(runs["sharpness_init"][0]) and np.isnan(runs["lr_edge_pred"][0])
    assert runs["lr_edge_note"][0].startswith("adam:")


def test_phases_from_the_loss_curve():
    T = 6
    curves = np.array([[10, 8, 6, 4, 3, 2],  # monotone
                       [10, 10.05, 9, 5, 3, 2],  # a rise under 1% of the initial value: monotone
                       [10, 30, 20, 5, 2, 1],  # catapult: up, then below the start
                       [10, 30, 40, 50, 60, 70],  # rose and never came back: diverged
                       [10, 8, 6, np.nan, np.nan, np.nan],  # non-finite
                       [10, 30, 20, 5, 2, 1]], dtype=float).T  # minibatches
    final = curves[-1].copy()
    diverged = np.array([False, False, False, False, True, False])
    valid = np.ones((T, 6), dtype=bool)
    valid[3:, 4] = False
    full = np.array([True] * 5 + [False])
    assert phases(curves, valid, final, diverged, full).tolist() == [
        "monotone", "monotone", "catapult", "diverged", "diverged", "not_full_batch"]


def test_a_module_without_a_second_derivative_warns_once_and_trains(nets, caplog):  # noqa: F811 - the fixture
    Path("oncenets.py").write_text(ONCE)
    sys.modules.pop("oncenets", None)
    runs_cfg = [module_cfg({"_target_": "oncenets.OnceNet"}, train={"seed": s, "steps": 8}, stats={"sharpness_every": 2})
                for s in range(2)]
    with caplog.at_level(logging.WARNING):
        trace = train_group(runs_cfg)
    warned = [r.getMessage() for r in caplog.records if "no sharpness" in r.getMessage()]
    assert len(warned) == 1 and "\n" not in warned[0] and "_embedding_bag_backward" in warned[0]
    runs, steps = build_tables(runs_cfg, trace)
    assert runs["sharpness_init"].isna().all() and runs["sharpness_final"].isna().all()
    assert steps["sharpness"].isna().all() and runs["final_loss"].notna().all()
    assert set(runs["phase"]) <= {"monotone", "catapult"}


ONCE = '''
import torch
from torch import nn


class OnceNet(nn.Module):
    """A sparse-features layer (EmbeddingBag, one bag per sample, the features as weights): PyTorch has no second
    derivative of _embedding_bag_backward."""

    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.bag, self.b = nn.EmbeddingBag(in_dim, 8, mode="sum"), nn.Linear(8, out_dim)

    def forward(self, x):
        idx = torch.arange(x.shape[1], device=x.device).repeat(x.shape[0])
        offsets = torch.arange(0, x.numel(), x.shape[1], device=x.device)
        return self.b(torch.tanh(self.bag(idx, offsets, per_sample_weights=x.reshape(-1))))
'''
