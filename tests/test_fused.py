"""The fused kernel (gradsweep.engine.kernels.fused, csrc/fused.cpp): the MLP written a second time, in C++, checked
against the model's own definition (gradsweep.engine.mlp.forward, losses.per_run_loss, autograd) in float64; each
run's bits independent of its neighbours and of the thread count. (The whole engine against plain PyTorch:
tests/test_train.py, engine=compiled.)"""

from __future__ import annotations

import pytest
import torch
from conftest import make_cfg

from gradsweep.config.sections import ACTIVATIONS
from gradsweep.engine.compiled import has_cxx
from gradsweep.engine.data import load_data
from gradsweep.engine.kernels import fused
from gradsweep.engine.losses import per_run_loss
from gradsweep.engine.mlp import RELU_FAMILY, SATURATING, build_params, forward, layers
from gradsweep.engine.stats import SATURATION_TOL

pytestmark = pytest.mark.skipif(not has_cxx(), reason="needs a C++ compiler")
CPU = torch.device("cpu")


def _setup(R, dtype=torch.float64, data="regression", loss="mse", perturb=0.3, **model):
    cfg = make_cfg(model={"depth": 3, "width": 6, **model}, data={"name": data}, loss=loss,
                   train={"dtype": "float64" if dtype == torch.float64 else "float32"})
    d = load_data(cfg.data)
    stack = build_params(cfg.model, [cfg.init] * R, list(range(R)), d.x.shape[1], d.out_dim, dtype, CPU)
    with torch.no_grad():  # PReLU slopes and biases away from their initial values, each run its own
        stack.flat.add_(perturb * torch.randn(stack.flat.shape, generator=torch.Generator().manual_seed(5), dtype=dtype))
    x = d.x.to(dtype).expand(R, *d.x.shape)
    y = (d.y.to(dtype) if d.y.is_floating_point() else d.y).expand(R, *d.y.shape)
    return cfg, stack, x, y


def _reference(cfg, stack, x, y):
    """The model's own forward pass, loss and autograd, and the statistics as the step programs reduce them."""
    params = dict(stack.params)
    f = forward(params, cfg.model, x)
    for h in f.outputs:
        h.retain_grad()
    loss = per_run_loss(cfg.loss, f.out, y)
    loss.sum().backward()
    grad = torch.cat([p.grad.flatten(1) for p in params.values()], dim=1)
    B, act = x.shape[1], cfg.model.activation
    fwd = {"out_norm": torch.stack([h.detach().flatten(1).norm(dim=1) for h in f.outputs], 1),
           "act_norm": torch.stack([z.detach().flatten(1).norm(dim=1) for z in f.acts], 1)}
    if act in SATURATING:
        lo = -1.0 if act == "tanh" else 0.0
        fwd["saturated"] = torch.stack([((z < lo + SATURATION_TOL) | (z > 1 - SATURATION_TOL)).flatten(1).double().mean(1)
                                        for z in f.acts], 1).to(x.dtype)
    if act in RELU_FAMILY:
        fwd["pos_sum"] = torch.stack([h.detach().clamp_min(0).sum(1) for h in f.act_inputs], 1)
    gsq = [h.grad.flatten(1).square().sum(1) for h in f.outputs]
    assert B == f.out.shape[1]
    return loss.detach(), grad, gsq, fwd


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("residual", [False, True])
def test_it_equals_the_model_and_autograd_in_float64(activation, residual):
    _check_against_the_model(activation=activation, residual=residual)


def test_a_skip_around_the_first_block():
    _check_against_the_model(activation="selu", residual=True, width=1)  # the data's one input: block 1 has a skip too


def _check_against_the_model(**model):
    cfg, stack, x, y = _setup(11, **model)
    loss_ref, grad_ref, gsq_ref, fwd_ref = _reference(cfg, stack, x, y)
    step = fused.FusedPass(cfg.model, stack.layout, cfg.loss, torch.float64)
    loss, grad, gsq, fwd = step(stack.flat.detach(), x, y, True)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-300)
    for k, ref in enumerate(gsq_ref):
        torch.testing.assert_close(gsq[:, k, 0], ref, rtol=1e-10, atol=1e-300, msg=f"|dL/dh|^2 of layer {k}")
    assert fwd.keys() == fwd_ref.keys()
    for name in fwd:
        torch.testing.assert_close(fwd[name], fwd_ref[name], rtol=1e-10, atol=1e-300, msg=name)


@pytest.mark.parametrize("data,loss", [("digits", "cross_entropy"), ("gaussian", "projection"), ("scaled", "mse")])
def test_every_loss(data, loss):
    cfg, stack, x, y = _setup(9, data=data, loss=loss, activation="tanh", depth=2)
    loss_ref, grad_ref, *_ = _reference(cfg, stack, x, y)
    got, grad, _, _ = fused.FusedPass(cfg.model, stack.layout, cfg.loss, torch.float64)(stack.flat.detach(), x, y, False)
    torch.testing.assert_close(got, loss_ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-10, atol=1e-300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_run_gets_the_same_bits_beside_any_neighbours_and_threads(dtype):
    cfg, stack, x, y = _setup(19, dtype=dtype, activation="gelu", residual=True, width=1, depth=4, data="digits",
                              loss="cross_entropy")
    step = fused.FusedPass(cfg.model, stack.layout, cfg.loss, dtype)
    flat = stack.flat.detach().clone()
    flat[4] = float("nan")  # a diverged neighbour in the first tile of 8
    whole = step(flat, x, y, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two_threads = step(flat, x, y, True)
    finally:
        torch.set_num_threads(threads)
    for r in (0, 5, 17):
        alone = step(flat[[r, r]].contiguous(), x[:2], y[:2], True)
        for got, mine in ((alone, whole), (two_threads, whole)):
            rows = [0, 1] if got is alone else [r, r]
            assert torch.equal(got[0][rows[0]], mine[0][r]) and torch.equal(got[1][rows[0]], mine[1][r])
            assert torch.equal(got[2][rows[0]], mine[2][r])
            for name in mine[3]:
                assert torch.equal(got[3][name][rows[0]], mine[3][name][r]), name
    assert torch.isnan(whole[0][4]) and torch.isfinite(whole[0][[3, 5]]).all()
    assert torch.isnan(whole[2][4]).all()  # both sums of (dL/dh)^2, so that its norm is NaN (stats.safe_norm's)


def test_it_applies_to_nets_without_norm_layers_through_the_kernels():
    model = make_cfg().model
    assert fused.applies(model, "mse", torch.float32, "kernel")
    assert not fused.applies(make_cfg(model={"norm": "layernorm"}).model, "mse", torch.float32, "kernel")
    assert not fused.applies(model, "mse", torch.float32, "bmm")  # CUDA, or a CPU without the kernels
    assert not fused.applies(model, "mse", torch.float16, "kernel")


def test_arguments_that_do_not_fit_the_net_are_a_value_error():
    cfg, stack, x, y = _setup(3)
    step = fused.FusedPass(cfg.model, stack.layout, cfg.loss, torch.float64)
    with pytest.raises(ValueError, match="do not fit this net"):
        step(stack.flat.detach()[:, :-1].contiguous(), x, y, False)
    with pytest.raises(ValueError, match="do not fit this net"):
        step(stack.flat.detach().float(), x, y, False)
    with pytest.raises(ValueError, match=r"targets must be \(3, 100, 1\) torch.float64"):
        step(stack.flat.detach(), x, y.float(), False)
    with pytest.raises(ValueError, match=r"targets must be \(3, 100, 1\)"):
        step(stack.flat.detach(), x, y.expand(3, 100, 2), False)
    cfg_ce, stack_ce, x_ce, y_ce = _setup(3, data="digits", loss="cross_entropy")
    step_ce = fused.FusedPass(cfg_ce.model, stack_ce.layout, "cross_entropy", torch.float64)
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\)"):
        step_ce(stack_ce.flat.detach(), x_ce, y_ce + 10, False)
    from gradsweep.engine.optim import StackedOptimizer, clip_vector

    flat = stack.flat.detach().clone()
    opt = StackedOptimizer(flat, [cfg.optim] * 3)
    alive, diverged, reason = torch.ones(3, dtype=torch.bool), torch.full((3,), -1), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"fused update: alive \(2,\) torch.bool does not fit flat"):
        fused.update(flat, flat.clone(), flat[:, 0].clone(), alive[:2], diverged, reason, 0, opt, clip_vector([None] * 3, flat),
                     None)


@pytest.mark.parametrize("optim", [{"name": "sgd", "momentum": 0.9, "weight_decay": 1e-2},
                                   {"name": "sgd"},
                                   {"name": "adam", "weight_decay": 1e-2}])
def test_its_update_equals_gradsweeps_optimisers_and_statistics(optim):
    """fused.update against optim.screen, clip and sgd_update/adam_update and stacked.sums (the step programs'
    update), over three steps: per-run settings, clipping on some runs, and a run whose loss turns NaN."""
    from gradsweep.engine.kernels.stacked import sums as layer_sums
    from gradsweep.engine.optim import StackedOptimizer, adam_update, clip, clip_vector, screen, sgd_update
    from gradsweep.engine.stats import StatsPlan

    cfg, stack, x, y = _setup(6, activation="tanh")
    cfgs = [make_cfg(optim={**optim, "lr": 0.01 * (r + 1)}).optim for r in range(6)]
    flat = stack.flat.detach()
    mine_opt, ref_opt = StackedOptimizer(flat.clone(), cfgs), StackedOptimizer(flat.clone(), cfgs)
    max_norm = clip_vector([None, 0.01, 1.0, None, 0.05, None], flat)
    plan = StatsPlan(stack.layout, layers(cfg.model), "tanh", torch.float64, CPU)
    R = 6
    mine = [torch.ones(R, dtype=torch.bool), torch.full((R,), -1), torch.zeros(R, dtype=torch.long)]
    ref = [t.clone() for t in mine]
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        grad = torch.randn(flat.shape, generator=gen, dtype=torch.float64)
        loss = torch.rand(R, generator=gen, dtype=torch.float64)
        if step == 1:
            loss[3] = float("nan")
        w_before = ref_opt.flat.clone()
        total, clipped, (sums, gmax) = fused.update(mine_opt.flat, grad, loss, *mine, step, mine_opt, max_norm,
                                                    (torch.tensor(plan.offsets), torch.tensor(plan.numels)))
        g, total_ref, alive, ref[1], ref[2] = screen([grad], loss, *ref, step)
        ref[0] = alive
        cg, clipped_ref = clip(g, total_ref, max_norm)
        if optim["name"] == "sgd":
            u, ref_opt.buf = sgd_update(w_before, cg, ref_opt.buf, alive, ref_opt.lr, ref_opt.momentum,
                                        ref_opt.weight_decay, ref_opt.use_wd)
        else:
            u, ref_opt.exp_avg, ref_opt.exp_avg_sq = adam_update(
                w_before, cg, ref_opt.exp_avg, ref_opt.exp_avg_sq, alive, step + 1, ref_opt.lr, ref_opt.beta1,
                ref_opt.beta2, ref_opt.eps, ref_opt.weight_decay, ref_opt.use_wd)
        ref_opt.flat.add_(u)
        sums_ref, gmax_ref = layer_sums(g, u, w_before, plan.offsets, plan.numels, plan.scale)
        for a, b in zip(mine, ref):
            assert torch.equal(a, b)
        torch.testing.assert_close(total, total_ref, rtol=1e-13, atol=0)
        assert torch.equal(clipped.bool(), clipped_ref) and clipped_ref[[1, 4]].all()
        torch.testing.assert_close(mine_opt.flat, ref_opt.flat, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(sums, sums_ref, rtol=1e-12, atol=1e-300)
        torch.testing.assert_close(gmax, gmax_ref, rtol=0, atol=0)
    assert mine[1].tolist() == [-1, -1, -1, 1, -1, -1] and mine[2][3] == 1  # the NaN loss at step 1: reason "loss"
