"""gradsweep.engine.init against torch.nn.init: each scheme and option draws what nn.init draws from the same generator
state (the same function on the same RNG stream: bit-equal everywhere)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gradsweep.config.sections import InitCfg
from gradsweep.engine.init import INIT_SCHEMES, apply_init

SHAPE = (5, 8)  # (fan_out, fan_in), as nn.Linear(8, 5)

CASES = [
    (InitCfg(scheme="xavier"), lambda w: nn.init.xavier_uniform_(w, gain=1.0)),
    (InitCfg(scheme="xavier", distribution="normal", gain=2.0), lambda w: nn.init.xavier_normal_(w, gain=2.0)),
    (InitCfg(scheme="kaiming"), lambda w: nn.init.kaiming_uniform_(w, a=0.0, mode="fan_in", nonlinearity="relu")),
    (InitCfg(scheme="kaiming", distribution="normal", mode="fan_out", nonlinearity="leaky_relu", a=0.2),
     lambda w: nn.init.kaiming_normal_(w, a=0.2, mode="fan_out", nonlinearity="leaky_relu")),
    (InitCfg(scheme="kaiming", nonlinearity="tanh"), lambda w: nn.init.kaiming_uniform_(w, nonlinearity="tanh")),
    (InitCfg(scheme="normal", mean=0.5, std=0.3), lambda w: nn.init.normal_(w, mean=0.5, std=0.3)),
    (InitCfg(scheme="uniform", bound=0.7), lambda w: nn.init.uniform_(w, -0.7, 0.7)),
    (InitCfg(scheme="orthogonal", gain=1.5), lambda w: nn.init.orthogonal_(w, gain=1.5)),
    (InitCfg(scheme="default"), lambda w: None),
]


@pytest.mark.parametrize("cfg,reference", CASES, ids=[f"{c.scheme}-{i}" for i, (c, _) in enumerate(CASES)])
def test_scheme_draws_what_nn_init_draws(cfg, reference):
    torch.manual_seed(3)
    layer = nn.Linear(SHAPE[1], SHAPE[0])
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    state = torch.get_rng_state()
    apply_init(w, b, cfg)
    torch.set_rng_state(state)
    want = layer.weight.detach().clone()
    with torch.no_grad():
        reference(want)
    assert torch.equal(w, want)
    assert torch.equal(b, layer.bias.detach())  # init.bias null: PyTorch's own bias kept


def test_every_scheme_is_tested():
    assert {c.scheme for c, _ in CASES} == set(INIT_SCHEMES)


def test_bias_fills_every_bias():
    w, b = torch.zeros(SHAPE), torch.ones(SHAPE[0])
    apply_init(w, b, InitCfg(scheme="default", bias=0.25))
    assert torch.equal(b, torch.full((SHAPE[0],), 0.25))
    apply_init(w, None, InitCfg(scheme="default", bias=0.25))  # a layer without bias: nothing to fill
