"""The model against plain PyTorch: the reproducibility contract bit for bit, the forward pass in float64."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_cfg
from reference import RefMLP, article_linears
from torch import nn

from gradsweep.engine.mlp import build_params, forward, layers

REINIT = {
    "default": None,
    "xavier": nn.init.xavier_uniform_,
    "kaiming": nn.init.kaiming_uniform_,
    "large": lambda w: nn.init.normal_(w, mean=0.0, std=10.0),
    "orthogonal": nn.init.orthogonal_,
    "uniform": lambda w: nn.init.uniform_(w, -0.05, 0.05),
    "normal": lambda w: nn.init.normal_(w, mean=0.0, std=0.01),
}
PRESETS = {
    "default": {"name": "default", "scheme": "default"},
    "xavier": {"name": "xavier", "scheme": "xavier"},
    "kaiming": {"name": "kaiming", "scheme": "kaiming"},
    "large": {"name": "large", "scheme": "normal", "std": 10.0},
    "orthogonal": {"name": "orthogonal", "scheme": "orthogonal"},
    "uniform": {"name": "uniform", "scheme": "uniform", "bound": 0.05},
    "normal": {"name": "normal", "scheme": "normal", "std": 0.01},
}


@pytest.mark.parametrize("init", list(REINIT))
@pytest.mark.parametrize("seed", [0, 7])
def test_initial_parameters_bit_for_bit(init, seed):
    cfg = make_cfg(init=PRESETS[init], train={"seed": seed})
    params = build_params(cfg.model, [cfg.init], [seed], 1, 1, torch.float32, "cpu").params
    ref = article_linears(seed, cfg.model.depth, cfg.model.width, REINIT[init])
    for i, lin in enumerate(ref, start=1):
        assert torch.equal(params[f"linear{i}.weight"][0], lin.weight), f"linear{i}.weight"
        assert torch.equal(params[f"linear{i}.bias"][0], lin.bias), f"linear{i}.bias"


def test_stacked_runs_each_match_their_own_seed():
    cfgs = [make_cfg(init=PRESETS["xavier"], train={"seed": s}) for s in (3, 1, 3)]
    params = build_params(cfgs[0].model, [c.init for c in cfgs], [3, 1, 3], 1, 1, torch.float64, "cpu").params
    for r, seed in enumerate((3, 1, 3)):
        ref = article_linears(seed, 10, 10, nn.init.xavier_uniform_)
        assert torch.equal(params["linear1.weight"][r], ref[0].weight.double())
    assert torch.equal(params["linear5.weight"][0], params["linear5.weight"][2])


def test_global_rng_untouched():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_params(make_cfg().model, [make_cfg().init], [0], 1, 1, torch.float32, "cpu")
    assert torch.equal(torch.rand(3), expected)


def test_bias_constant_and_gain():
    cfg = make_cfg(init={"name": "xavier", "scheme": "xavier", "distribution": "normal", "gain": 2.0, "bias": 0.0})
    params = build_params(cfg.model, [cfg.init], [0], 1, 1, torch.float32, "cpu").params
    ref = article_linears(0, 10, 10, lambda w: nn.init.xavier_normal_(w, gain=2.0))
    assert torch.equal(params["linear2.weight"][0], ref[1].weight)
    assert torch.count_nonzero(params["linear2.bias"]) == 0


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "relu", "leaky_relu", "prelu", "elu", "gelu", "selu", "identity"])
@pytest.mark.parametrize("norm,residual", [("none", False), ("batchnorm", False), ("layernorm", True)])
def test_forward_matches_plain_pytorch(activation, norm, residual):
    cfg = make_cfg(model={"depth": 4, "width": 6, "activation": activation, "norm": norm, "residual": residual},
                   data={"name": "scaled", "n_features": 3, "scale_min": 0.1, "scale_max": 10.0})
    params = build_params(cfg.model, [cfg.init], [5], 3, 1, torch.float64, "cpu").params
    ref = RefMLP(article_linears(5, 4, 6, in_dim=3), activation, norm, residual).double()
    x = torch.randn(32, 3, dtype=torch.float64)
    got = forward(params, cfg.model, x.unsqueeze(0))
    want = ref(x)
    torch.testing.assert_close(got.out[0], want, rtol=1e-12, atol=1e-12)
    assert len(got.outputs) == len(ref.outputs) == len(layers(cfg.model))
    for g, w in zip(got.outputs, ref.outputs):
        torch.testing.assert_close(g[0], w, rtol=1e-12, atol=1e-12)


def test_residual_skips_only_where_shapes_allow():
    cfg = make_cfg(model={"depth": 3, "width": 4, "activation": "identity", "residual": True})
    params = build_params(cfg.model, [cfg.init], [0], 1, 1, torch.float64, "cpu").params
    x = torch.randn(1, 5, 1, dtype=torch.float64)
    fwd = forward(params, cfg.model, x)
    # Block 1 maps 1 -> 4 (no skip); blocks 2 and 3 add their input.
    a1 = fwd.acts[0]
    a2 = fwd.acts[1] + a1
    torch.testing.assert_close(fwd.outputs[2], torch.baddbmm(params["linear3.bias"].unsqueeze(1), a2,
                                                            params["linear3.weight"].transpose(1, 2)))
    assert not math.isnan(float(fwd.out.detach().sum()))
