"""The per-weight reductions of StatsPlan against per-parameter slicing, non-finite and zero entries included."""

from __future__ import annotations

import math

import pytest
import torch

from gradsweep.config.sections import ModelCfg
from gradsweep.engine.mlp import ParamMap, forward, layers
from gradsweep.engine.stats import StatsPlan, _evenly_spaced
from gradsweep.results.schema import LAYER_STATS


def _layout(model: ModelCfg) -> ParamMap:
    from gradsweep.config.sections import linear_dims

    t: dict[str, torch.Tensor] = {}
    for i, (fi, fo) in enumerate(linear_dims(model, 3, 2), start=1):
        t[f"linear{i}.weight"], t[f"linear{i}.bias"] = torch.empty(fo, fi), torch.empty(fo)
        if model.norm != "none" and i <= model.depth:
            t[f"norm{i}.weight"], t[f"norm{i}.bias"] = torch.empty(fo), torch.empty(fo)
        if model.activation == "prelu" and i <= model.depth:
            t[f"act{i}.weight"] = torch.empty(1)
    return ParamMap.of(t)


def test_evenly_spaced_runs_cover_every_span_once():
    spans = [(0, 0, 10), (1, 20, 100), (2, 130, 100), (3, 240, 100), (4, 400, 100), (5, 500, 10)]
    runs = _evenly_spaced(spans)
    assert sorted(r for run in runs for r in run.rows) == list(range(6))
    for run in runs:
        for j, r in enumerate(run.rows):
            assert spans[r][1] == run.offset + j * run.stride and spans[r][2] == run.numel
    assert any(run.rows == (1, 2, 3) for run in runs)  # 400 breaks the step of 110


@pytest.mark.parametrize("model", [ModelCfg(depth=5, width=4), ModelCfg(depth=3, width=6, norm="batchnorm"),
                                   ModelCfg(depth=4, width=3, activation="prelu", norm="layernorm"),
                                   ModelCfg(depth=1, width=5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradient_statistics_equal_per_parameter_slicing(model, dtype):
    # Zeros, NaN, +inf and -inf in the gradient: each layer's counts and norms see only its own entries.
    lay, layout, R = layers(model), _layout(model), 4
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(R, layout.size, dtype=dtype, generator=gen)
    g[g.abs() < 0.3] = 0.0
    g[1, 3], g[1, 7], g[2, layout.size - 1], g[3, 0] = math.nan, math.inf, -math.inf, math.nan
    w = torch.randn(R, layout.size, dtype=dtype, generator=gen)
    u = torch.randn(R, layout.size, dtype=dtype, generator=gen) * 1e-3
    updated = torch.tensor([True, False, True, True])
    params = {n: w[:, layout.span(n)].view(R, *s).detach().requires_grad_() for n, s in zip(layout.names, layout.shapes)}
    plan = StatsPlan(layout, lay, model.activation, dtype, "cpu")
    plan.start()
    fwd = forward(params, model, torch.randn(R, 7, 3, dtype=dtype, generator=gen), plan.probe)
    plan.weight_sq(w)
    torch.autograd.grad(sum(t.sum() for t in fwd.outputs), list(params.values()), allow_unused=True)
    stats = plan.collect(g, u, updated)
    S = {name: i for i, name in enumerate(LAYER_STATS)}
    for k, la in enumerate(lay):
        span = layout.span(f"{la.name}.weight")
        cols, n = g[:, span], span.stop - span.start
        got = stats[:, k]
        torch.testing.assert_close(got[:, S["wgrad_norm"]], torch.linalg.vector_norm(cols, dim=1), equal_nan=True)
        torch.testing.assert_close(got[:, S["wgrad_rms"]], torch.linalg.vector_norm(cols, dim=1) / n**0.5, equal_nan=True)
        torch.testing.assert_close(got[:, S["wgrad_max"]], cols.abs().amax(1), equal_nan=True)
        assert torch.equal(got[:, S["wgrad_zero_frac"]], (cols == 0).to(dtype).sum(1) / n)
        assert torch.equal(got[:, S["wgrad_nonfinite"]], (~torch.isfinite(cols)).to(dtype).sum(1))
        w_norm = torch.linalg.vector_norm(w[:, span], dim=1)
        torch.testing.assert_close(got[:, S["weight_norm"]], w_norm)
        ratio = torch.where(updated, torch.linalg.vector_norm(u[:, span], dim=1) / w_norm, math.nan)
        torch.testing.assert_close(got[:, S["update_ratio"]], ratio, equal_nan=True)
    assert stats[1, :, S["wgrad_nonfinite"]].sum() == 2 and stats[3, :, S["wgrad_nonfinite"]].sum() == 1


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu"])
def test_dead_units_are_those_never_positive_over_the_batch(activation):
    model = ModelCfg(depth=3, width=5, activation=activation)
    lay, layout, R = layers(model), _layout(model), 3
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(R, layout.size, dtype=torch.float64, generator=gen)
    params = {n: w[:, layout.span(n)].view(R, *s).detach().requires_grad_() for n, s in zip(layout.names, layout.shapes)}
    with torch.no_grad():
        params["linear2.bias"][0, :2] = -1e6  # two units of block 2 of run 0 never fire
    plan = StatsPlan(layout, lay, activation, torch.float64, "cpu")
    plan.start()
    fwd = forward(params, model, torch.randn(R, 9, 3, dtype=torch.float64, generator=gen), plan.probe)
    plan.weight_sq(w)
    torch.autograd.grad(sum(t.sum() for t in fwd.outputs), list(params.values()), allow_unused=True)
    stats = plan.collect(w, w, torch.ones(R, dtype=torch.bool))
    dead = stats[:, :model.depth, LAYER_STATS.index("dead_frac")]
    expect = torch.stack([(h <= 0).all(dim=1).double().mean(dim=1) for h in fwd.act_inputs], dim=1)
    assert torch.equal(dead, expect) and dead[0, 1] >= 0.4


def test_a_run_whose_last_weight_ends_the_matrix_is_reduced_whole():
    # Two weights of 4 with a gap of 2 after the first and none after the second: the run's rows of stride 6
    # reach 2 columns past the end of the (R, 10) matrix (the last weight is reduced on its own).
    plan = object.__new__(StatsPlan)
    plan.runs = _evenly_spaced([(0, 0, 4), (1, 6, 4)])
    plan.unpermute = torch.tensor([0, 1])
    assert plan.runs[0].rows == (0, 1) and plan.runs[0].stride == 6
    x = torch.arange(30.0).reshape(3, 10)
    for reduce in (torch.sum, torch.amax):
        expected = torch.stack([reduce(x[:, 0:4], -1), reduce(x[:, 6:10], -1)], dim=1)
        assert torch.equal(plan.per_weight(x, reduce), expected)


@pytest.mark.parametrize("dtype,size", [(torch.float64, 1.0), (torch.float32, 1e-30)])
def test_gradnorm_hands_back_the_norm_of_the_outputs_gradient_as_the_tokens(dtype, size):
    # The compiled engine's hgrad: dL/dh passes through unchanged, and the token's "gradient" is each run's norm of
    # dL/dh, also where its squares underflow (float32, entries of 1e-30).
    from gradsweep.engine.stats import GradNorm, small_scale

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 5, 4, dtype=dtype, generator=gen, requires_grad=True)
    token = torch.zeros(3, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 5, 4, dtype=torch.float64, generator=gen) * size
    out = GradNorm.apply(h, token, *small_scale(dtype))
    assert torch.equal(out, h)
    gh, gt = torch.autograd.grad((out * w.to(dtype)).sum(), [h, token])
    assert torch.equal(gh, w.to(dtype))
    torch.testing.assert_close(gt.double(), w.flatten(1).norm(dim=1), rtol=1e-6 if dtype == torch.float32 else 1e-15,
                               atol=0)
