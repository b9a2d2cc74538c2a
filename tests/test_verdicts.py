"""Whole-run verdicts (gradsweep.results.verdicts) against closed forms, plain PyTorch twins and float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_cfg
from reference import article_data, article_linears
from torch import nn
from torch.nn import functional as F

from gradsweep.engine.losses import baseline_loss
from gradsweep.engine.train import train_group
from gradsweep.results.tables import build_tables
from gradsweep.results.verdicts import (
    CUT,
    NO_SIGNAL,
    SIGNAL,
    UNDERFLOW,
    conditions,
    dead_runs,
    underflow_floor,
    verdicts,
    zero_causes,
)


def _cond(r0, rmed, final, base=10.0, lo=-2.0, hi=2.0, margin=0.01):
    n = len(r0)
    return conditions(np.array(r0, float), np.array(rmed, float), np.array(final, float), np.full(n, base),
                      np.full(n, lo), np.full(n, hi), np.full(n, margin))


def test_precedence_and_the_step_0_part():
    #          healthy  stalled  vanish@0  vanish in training  explode@0  explode in training  nan@0
    r0 = [0.0, 0.0, -2.5, 0.5, 3.0, 0.5, np.nan, -2.5, 0.0, 0.0]
    rmed = [0.0, 0.0, 0.0, -3.0, 0.0, 2.5, 0.0, 2.5, 0.0, -np.inf]
    final = [1.0, 9.95, 1.0, 1.0, 1.0, 1.0, 1.0, 10.0, 1.0, 1.0]
    cond = _cond(r0, rmed, final)
    diverged = np.zeros(10, bool)
    diverged[8] = True
    dead = np.zeros(10, bool)
    dead[9] = True
    verdict, init = verdicts(diverged, dead, cond)
    assert verdict.tolist() == ["healthy", "stalled", "vanishing", "vanishing", "exploding", "exploding", "vanishing",
                                "vanishing", "diverged", "dead"]
    # Step 0 decides when it is beyond a threshold (run 7: vanishing at 0, exploding later, and stalled too).
    assert init.tolist() == ["healthy", "healthy", "vanishing", "healthy", "exploding", "healthy", "vanishing",
                             "vanishing", "healthy", "healthy"]
    assert cond["stalled"][7] and cond["stalled"][1] and not cond["stalled"][0]


def test_stalled_is_the_margin_below_the_baseline_and_never_without_one():
    cond = _cond([0.0] * 4, [0.0] * 4, [9.9, 9.89, 9.91, np.nan])
    assert cond["stalled"].tolist() == [True, False, True, False]  # (1 - 0.01) * 10 = 9.9
    none = _cond([0.0], [0.0], [1e6], base=np.nan)  # loss=projection has no baseline
    assert not none["stalled"][0]


def test_baseline_losses_are_the_trivial_predictors_loss():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(50, 3, generator=g) * torch.tensor([1.0, 2.0, 3.0]) + 5
    mean = y.mean(dim=0).expand_as(y)
    assert baseline_loss("mse", y) == pytest.approx(F.mse_loss(mean.double(), y.double()).item(), rel=1e-12)
    labels = torch.tensor([0, 0, 1, 3, 3, 3, 3, 7])
    prior = torch.bincount(labels, minlength=10).double() / len(labels)
    logits = prior.clamp_min(1e-300).log().expand(len(labels), 10)  # predicting the class prior for every point
    assert baseline_loss("cross_entropy", labels) == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-12)
    assert np.isnan(baseline_loss("projection", y))


def test_zero_causes_tell_a_cut_from_an_underflow():
    floor = underflow_floor("float32")
    assert floor == pytest.approx(np.finfo(np.float32).tiny / np.finfo(np.float32).eps)
    h = np.array([
        [0.0, 0.0, 1e-3, 0.5, 1.0],  # cut below a normal signal: dead units
        [0.0, 1e-44, 1e-40, 1e-30, 1.0],  # a decaying signal rounded to 0: underflow
        [1e-5, 1e-4, 1e-3, 1e-2, 1.0],  # signal everywhere
        [0.0, 0.0, 0.0, 0.0, 0.0],  # nothing anywhere (the readout's own gradient is 0)
    ])
    assert zero_causes(h, floor).tolist() == [[CUT, CUT, SIGNAL, SIGNAL, SIGNAL],
                                              [UNDERFLOW, SIGNAL, SIGNAL, SIGNAL, SIGNAL],
                                              [SIGNAL] * 5, [NO_SIGNAL] * 5]


def test_dead_is_the_final_stretch_of_cuts():
    steps = np.arange(6)
    alive, cut = [1e-2, 1e-2, 1.0], [0.0, 5e-3, 1.0]
    under = [0.0, 1e-45, 1.0]
    runs = [
        [cut] * 6,  # born dead
        [alive, alive, cut, alive, cut, cut],  # dies, recovers, dies for good at step 4
        [alive, alive, alive, alive, alive, cut],  # dies at the very last step
        [alive, cut, cut, cut, alive, alive],  # recovers: not dead
        [alive, under, under, under, under, under],  # underflows: not dead
        [cut, cut, cut, alive, alive, alive],  # dead until it diverged at step 3 (rows after are invalid)
    ]
    h = np.array(runs).transpose(1, 0, 2)  # (T, R, L)
    valid = np.ones((6, 6), bool)
    valid[3:, 5] = False
    dead_step, dead_layer = dead_runs(h, steps, valid, np.array([1, 2, 3]), underflow_floor("float32"))
    assert dead_step.tolist() == [0, 4, 5, -1, -1, 0]
    assert dead_layer.tolist() == [2, 2, 2, -1, -1, 2]


def test_mission_runs_dead_healthy_and_stalled():
    """The issue's cases, float32 as the quick start trains them: Kaiming depth 30 (seed 0, lr 0.01) dies at step 1
    (its loss stays at Var(y)); depth 2 is healthy; lr 1e-6 learns nothing."""
    def run(depth, lr, init="kaiming", steps=500):
        cfg = make_cfg(model={"depth": depth}, init={"name": init, "scheme": init}, optim={"lr": lr},
                       train={"steps": steps})
        return build_tables([cfg], train_group([cfg]))[0].iloc[0]

    deep = run(30, 0.01)
    assert (deep.verdict, deep.init_verdict, deep.dead_step) == ("dead", "healthy", 1)
    assert deep.final_loss == pytest.approx(deep.baseline_loss, rel=1e-4)  # it predicts the mean of y
    x, y = article_data()
    assert deep.baseline_loss == pytest.approx(float(y.double().var(unbiased=False)), rel=1e-12)
    assert 1 <= deep.dead_layer <= 31
    for init in ("xavier", "kaiming"):
        shallow = run(2, 0.01, init)
        assert shallow.verdict == "healthy" and shallow.loss_drop_log10 > 1
    slow = run(2, 1e-6)
    assert slow.verdict == "stalled" and slow.final_loss >= 0.99 * slow.baseline_loss


def test_a_float32_signal_that_underflows_is_vanishing_not_dead():
    """Depth-60 sigmoid: the signal reaching layer 1 is ~1e-54 (float64), below float32's least subnormal, so float32
    computes exactly 0 there. That is a vanishing signal, not dead units. At depth 30 (~1e-26) float32 records the
    signal float64 records: its norms are summed without underflow."""
    def run(depth, dtype):
        cfg = make_cfg(model={"depth": depth, "activation": "sigmoid"}, train={"steps": 3, "dtype": dtype})
        return build_tables([cfg], train_group([cfg]))

    runs32, steps32 = run(60, "float32")
    runs64, steps64 = run(60, "float64")
    first32 = steps32[(steps32.layer == 1) & (steps32.step == 0)].hgrad_norm.iloc[0]
    first64 = steps64[(steps64.layer == 1) & (steps64.step == 0)].hgrad_norm.iloc[0]
    assert first32 == 0.0 and 0 < first64 < np.finfo(np.float32).smallest_subnormal
    assert runs32.verdict.iloc[0] == "vanishing" and runs32.dead_step.isna().all()
    r32, s32 = run(30, "float32")
    r64, s64 = run(30, "float64")
    assert 1e-30 < s64[s64.layer == 1].hgrad_norm.iloc[0] < 1e-20
    np.testing.assert_allclose(s32.hgrad_norm, s64.hgrad_norm, rtol=1e-3)
    np.testing.assert_allclose(s32.wgrad_norm, s64.wgrad_norm, rtol=1e-3)
    assert r32.grad_ratio_log10.iloc[0] == pytest.approx(r64.grad_ratio_log10.iloc[0], abs=1e-3)


def _twin_first_layer_zero(seed: int, steps: int) -> tuple[np.ndarray, bool]:
    """nn.Sequential of the same Linear layers (Kaiming, float64), torch.optim.SGD: per step, is the first layer's
    weight gradient exactly zero; and did the loss stay finite."""
    lin = article_linears(seed, 30, 10, nn.init.kaiming_uniform_)
    mods: list[nn.Module] = []
    for layer in lin[:-1]:
        mods += [layer, nn.ReLU()]
    net = nn.Sequential(*mods, lin[-1]).double()
    x, y = (t.double() for t in article_data())
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    zero, finite = [], True
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(net(x), y)
        loss.backward()
        finite &= bool(torch.isfinite(loss))
        zero.append(bool((lin[0].weight.grad == 0).all()))
        opt.step()
    return np.array(zero), finite


@pytest.mark.slow
def test_dead_exactly_where_a_plain_pytorch_twin_stops_learning_in_layer_1():
    """20 seeds of ReLU depth 30, width 10, Kaiming, lr 0.01, 200 steps: ``dead`` exactly for the seeds whose twin's
    first-layer gradient is exactly zero over the last logged steps (and did not diverge: diverged comes first),
    from the same step. float64: at depth 30 training is chaotic enough that float32's different rounding on the
    batched and the nn.Linear paths sends a few seeds different ways (seen: 3 of 20)."""
    steps, last = 200, 20
    cfgs = [make_cfg(model={"depth": 30}, init={"name": "kaiming", "scheme": "kaiming"}, optim={"lr": 0.01},
                     train={"steps": steps, "seed": s, "dtype": "float64"}) for s in range(20)]
    runs, _ = build_tables(cfgs, train_group(cfgs))
    dead_twins = []
    for s in range(20):
        zero, finite = _twin_first_layer_zero(s, steps)
        if zero[-last:].all() and finite:
            dead_twins.append(s)
            live = np.flatnonzero(~zero)
            assert runs.dead_step[s] == (live[-1] + 1 if live.size else 0)
    assert runs.index[runs.verdict == "dead"].tolist() == dead_twins
    assert len(dead_twins) >= 3  # the seeds that die: 0, 4, 9, 10, 17, 19 (seen)
