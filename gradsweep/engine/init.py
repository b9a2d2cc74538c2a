"""Init schemes, chosen by name from a registry, applied to a Linear layer's tensors right after they are drawn."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from gradsweep.config.sections import InitCfg


def _xavier(w: torch.Tensor, cfg: InitCfg) -> None:
    if cfg.distribution == "uniform":
        nn.init.xavier_uniform_(w, gain=cfg.gain)
    else:
        nn.init.xavier_normal_(w, gain=cfg.gain)


def _kaiming(w: torch.Tensor, cfg: InitCfg) -> None:
    fn = nn.init.kaiming_uniform_ if cfg.distribution == "uniform" else nn.init.kaiming_normal_
    fn(w, a=cfg.a, mode=cfg.mode, nonlinearity=cfg.nonlinearity)


INIT_SCHEMES: dict[str, Callable[[torch.Tensor, InitCfg], None]] = {
    "default": lambda w, cfg: None,  # keep what nn.Linear drew
    "xavier": _xavier,
    "kaiming": _kaiming,
    "normal": lambda w, cfg: nn.init.normal_(w, mean=cfg.mean, std=cfg.std),
    "uniform": lambda w, cfg: nn.init.uniform_(w, -cfg.bound, cfg.bound),
    "orthogonal": lambda w, cfg: nn.init.orthogonal_(w, gain=cfg.gain),
}


def apply_init(weight: torch.Tensor, bias: torch.Tensor | None, cfg: InitCfg) -> None:
    """Re-initialise a Linear layer's tensors in place: the weight by ``cfg.scheme``, the bias if ``cfg.bias`` is set."""
    with torch.no_grad():
        INIT_SCHEMES[cfg.scheme](weight, cfg)
        if cfg.bias is not None and bias is not None:
            nn.init.constant_(bias, cfg.bias)
