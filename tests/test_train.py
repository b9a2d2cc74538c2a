"""Training and statistics against plain PyTorch (torch.optim, clip_grad_norm_, param.grad, tensor.grad)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_cfg, scaled
from reference import RefMLP, article_data, article_linears, reference_training
from torch import nn

from gradsweep.engine import compiled
from gradsweep.engine.train import _batches, train_group
from gradsweep.results.schema import LAYER_STATS

S = {name: i for i, name in enumerate(LAYER_STATS)}
REINIT = {"default": None, "kaiming": nn.init.kaiming_uniform_, "large": lambda w: nn.init.normal_(w, 0.0, 10.0)}


def _without_kernel(monkeypatch) -> None:
    """As on a machine without a C++ compiler (or on CUDA): eager trains through train_group's own loop (baddbmm,
    statistics through a probe and hooks) instead of the step programs through gradsweep's kernel."""
    monkeypatch.setattr(compiled, "linear_form", lambda device: "bmm")


@pytest.fixture(params=["eager", "eager-loop",
                        pytest.param("compiled", marks=[pytest.mark.slow, pytest.mark.xdist_group("compiled")])])
def engine(request, monkeypatch) -> str:
    """The reference tests run on both engines and both eager paths (compiling costs tens of seconds per shape: the
    slow tier, on one worker, where a program compiled for one test serves the next of the same shape)."""
    if request.param == "eager-loop":
        _without_kernel(monkeypatch)
        return "eager"
    return request.param


def _compare(cfg, ref_kwargs, reinit=None, rtol=1e-9, batches=None, engine="eager"):
    m = cfg.model
    trace = train_group([dataclasses.replace(cfg, engine=engine)])
    assert trace.engine == engine
    x, y = article_data()
    model = RefMLP(article_linears(cfg.train.seed, m.depth, m.width, reinit), m.activation, m.norm, m.residual).double()
    ref = reference_training(model, x.double(), y.double(), cfg.train.steps, activation=m.activation,
                             batches=batches, **ref_kwargs)
    np.testing.assert_allclose(trace.loss[:, 0], ref["loss"], rtol=rtol)
    np.testing.assert_allclose(trace.grad_norm[:, 0], ref["grad_norm"], rtol=rtol)
    np.testing.assert_array_equal(trace.clipped[:, 0], ref["clipped"].astype(bool))
    lay = trace.layer[:, 0]  # (T, L, S)
    for name in ("wgrad_norm", "wgrad_rms", "wgrad_max", "wgrad_zero_frac", "hgrad_norm", "weight_norm", "out_rms"):
        np.testing.assert_allclose(lay[:, :, S[name]], ref[name], rtol=rtol, atol=1e-300, err_msg=name)
    np.testing.assert_allclose(lay[:, :, S["update_ratio"]], ref["update_ratio"], rtol=1e-6, err_msg="update_ratio")
    hidden = [k for k in range(lay.shape[1]) if k % (2 if m.norm != "none" else 1) == 0][: m.depth]
    np.testing.assert_allclose(lay[:, hidden, S["act_rms"]], ref["act_rms"], rtol=rtol)
    if ref["saturated_frac"].size:
        np.testing.assert_array_equal(lay[:, hidden, S["saturated_frac"]], ref["saturated_frac"])
    if ref["dead_frac"].size:
        np.testing.assert_array_equal(lay[:, hidden, S["dead_frac"]], ref["dead_frac"])
    assert np.all(lay[:, :, S["wgrad_nonfinite"]] == 0)
    return trace


@pytest.mark.parametrize("init", ["default", "kaiming"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid", "tanh"])
def test_sgd_statistics_match_plain_pytorch(init, activation, engine):
    cfg = make_cfg(model={"depth": 4, "activation": activation},
                   init={"name": init, "scheme": init}, train={"steps": 25, "dtype": "float64", "seed": 3})
    _compare(cfg, {"lr": 0.01}, REINIT[init], engine=engine)


def test_clipping_equals_clip_grad_norm(engine):
    # The article's clipping experiment at small scale: std-10 weights, lr 0.1, clip at 10.
    # Depth 4, ReLU, SGD, float64: the compiled engine's program of the ReLU statistics test above serves it too.
    cfg = make_cfg(model={"depth": 4}, init={"name": "large", "scheme": "normal", "std": 10.0},
                   optim={"lr": 0.1}, train={"steps": 20, "dtype": "float64", "clip_norm": 10.0})
    trace = _compare(cfg, {"lr": 0.1, "clip_norm": 10.0}, REINIT["large"], engine=engine)
    assert trace.clipped[:, 0].any()


def test_momentum_and_weight_decay(engine):
    cfg = make_cfg(model={"depth": 3, "norm": "batchnorm"}, optim={"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-3},
                   train={"steps": 15, "dtype": "float64"})
    _compare(cfg, {"lr": 0.02, "momentum": 0.9, "weight_decay": 1e-3}, engine=engine)


def test_adam_with_layernorm_and_residual(engine):
    cfg = make_cfg(model={"depth": 3, "norm": "layernorm", "residual": True, "activation": "prelu"},
                   optim={"name": "adam", "lr": 0.01, "weight_decay": 0.01}, train={"steps": 15, "dtype": "float64"})
    _compare(cfg, {"optim": "adam", "lr": 0.01, "weight_decay": 0.01}, engine=engine)


def test_minibatches_follow_the_runs_own_order(engine):
    cfg = make_cfg(model={"depth": 2}, train={"steps": 12, "dtype": "float64", "batch_size": 32, "seed": 4})
    gen = _batches([cfg], 100)
    batches = [next(gen)[0] for _ in range(12)]
    # 3 batches per epoch (last partial batch dropped), a fresh permutation every epoch.
    assert sorted(torch.cat(batches[:3]).tolist()) == sorted(set(torch.cat(batches[:3]).tolist()))
    g = torch.Generator().manual_seed(4)
    assert torch.equal(batches[0], torch.randperm(100, generator=g)[:32])
    _compare(cfg, {"lr": 0.01}, batches=batches, engine=engine)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("variant", [
    {"optim": {"name": "sgd", "momentum": 0.9, "weight_decay": 1e-3}},
    {"optim": {"name": "adam"}, "model": {"norm": "batchnorm"}},
    {"train": {"batch_size": 32}, "model": {"norm": "layernorm", "residual": True, "activation": "prelu"}},
    {"train": {"batch_size": 32}, "model": {"residual": True, "activation": "prelu"}, "optim": {"name": "adam"}},
])
@pytest.mark.parametrize("path", ["auto", "programs", "loop"])
def test_a_run_in_a_group_equals_the_run_alone_bit_for_bit(dtype, variant, path, monkeypatch):
    # Per-run lr, clip norm, init and seed vary inside the group; BatchNorm statistics, minibatch order,
    # momentum and Adam state are per run. A lone run trains as a stack of two copies (see train_group),
    # so its numbers are the same bits as in any group. On every CPU path: auto (the fused kernel where there are no
    # norm layers, else the step programs op by op), eager (the step programs: the kernel's Linear), eager without
    # the kernels (the loop: baddbmm on a stack of at least two). In each kernel a run's arithmetic does not depend
    # on its lane.
    if path == "loop":
        _without_kernel(monkeypatch)
    engine = "auto" if path == "auto" else "eager"

    def cfg(lr, seed, clip, init):
        return make_cfg(model={"depth": 4, **variant.get("model", {})}, init={"name": init, "scheme": init},
                        optim={"lr": lr, **variant.get("optim", {})},
                        train={"steps": 40, "seed": seed, "dtype": dtype, "clip_norm": clip, **variant.get("train", {})},
                        engine=engine)
    cfgs = [cfg(0.01, 0, None, "xavier"), cfg(0.05, 1, 1.0, "kaiming"), cfg(0.02, 2, None, "default"),
            cfg(0.5, 3, None, "kaiming")]
    together = train_group(cfgs)
    for r, c in enumerate(cfgs):
        alone = train_group([c])
        np.testing.assert_array_equal(together.loss[:, r], alone.loss[:, 0])
        np.testing.assert_array_equal(together.layer[:, r], alone.layer[:, 0])
        np.testing.assert_array_equal(together.final_loss[r], alone.final_loss[0])


def test_divergence_is_data_and_freezes_only_that_run():
    cfgs = [make_cfg(model={"depth": 6}, init={"name": "large", "scheme": "normal", "std": 10.0}, optim={"lr": 0.1},
                     train={"steps": 40}),
            make_cfg(model={"depth": 6}, train={"steps": 40, "seed": 1})]
    trace = train_group(cfgs)
    alone = train_group([cfgs[1]])
    d = trace.diverged_step[0]
    assert 0 <= d < 40
    assert not np.isfinite(trace.loss[d, 0]) or not np.isfinite(trace.grad_norm[d, 0])
    assert trace.diverged_reason[0] in ("loss", "gradient") and trace.diverged_reason[1] is None
    assert trace.diverged_step[1] == -1
    # The neighbour is bit for bit its solo run: loss, gradient norms and every per-layer statistic.
    assert np.array_equal(trace.loss[:, 1], alone.loss[:, 0])
    assert np.array_equal(trace.grad_norm[:, 1], alone.grad_norm[:, 0])
    assert np.array_equal(trace.layer[:, 1], alone.layer[:, 0], equal_nan=True)
    assert trace.final_loss[1] == alone.final_loss[0]


def test_log_every_keeps_first_and_last_step():
    trace = train_group([make_cfg(model={"depth": 2}, train={"steps": 10, "log_every": 4})])
    assert trace.steps.tolist() == [0, 4, 8, 9]
    assert trace.layer.shape == (4, 1, 3, len(LAYER_STATS))


def test_float32_close_to_float64():
    t32 = train_group([make_cfg(model={"depth": 4}, train={"steps": 50})])
    t64 = train_group([make_cfg(model={"depth": 4}, train={"steps": 50, "dtype": "float64"})])
    np.testing.assert_allclose(t32.loss, t64.loss, rtol=1e-4)


def test_cross_entropy_on_digits_matches_plain_pytorch(engine):
    """data=digits: the fused loss and gradients against nn.Sequential + F.cross_entropy, float64, 15 steps."""
    from torch.nn import functional as F

    from gradsweep.engine.data import load_data

    cfg = make_cfg(model={"depth": 2, "width": 16}, data={"name": "digits", "n_samples": 300, "n_test": 100},
                   optim={"lr": 0.05}, train={"steps": 15, "dtype": "float64", "seed": 1})
    trace = train_group([dataclasses.replace(cfg, engine=engine)])
    d = load_data(cfg.data)
    lin = article_linears(1, 2, 16, None, in_dim=64, out_dim=10)
    model = nn.Sequential(lin[0], nn.ReLU(), lin[1], nn.ReLU(), lin[2]).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(d.x.double()), d.y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    np.testing.assert_allclose(trace.loss[:, 0], losses, rtol=1e-9)
    with torch.no_grad():
        logits = model(d.x_test.double())
    assert trace.test_loss[0] == pytest.approx(F.cross_entropy(logits, d.y_test).item(), rel=1e-9)
    assert trace.test_accuracy[0] == pytest.approx((logits.argmax(1) == d.y_test).double().mean().item(), abs=1e-12)


@pytest.mark.slow  # a subprocess
def test_blas_is_position_independent_once_gradsweep_is_imported_first():
    """gradsweep sets MKL_CBWR=AUTO,STRICT on import (before torch's first matrix product): a float32 product then
    has the same bits wherever its operands sit, which the float32 bit-for-bit tests above rest on. A process whose
    torch multiplied matrices before importing gradsweep keeps MKL's default; there the probe may say False (it
    does on AVX2 AMD EPYC), and gradsweep warns."""
    import os
    import subprocess
    import sys

    from gradsweep.engine.device import position_independent_blas

    assert position_independent_blas()
    late = ("import torch; torch.ones(4, 4) @ torch.ones(4, 4)\n"
            "import logging; logging.basicConfig()\n"
            "from gradsweep.engine.device import position_independent_blas as p; print(p())")
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    out = subprocess.run([sys.executable, "-c", late], capture_output=True, text=True, env=env, timeout=scaled(120))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("True", "False")
    if out.stdout.strip() == "False":
        assert "MKL_CBWR=AUTO,STRICT" in out.stderr
