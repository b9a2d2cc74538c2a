"""Plain-PyTorch references the tests check gradsweep against: the article's code, written out."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ACT = {
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "prelu": nn.PReLU,
    "elu": nn.ELU, "gelu": nn.GELU, "selu": nn.SELU, "identity": nn.Identity,
}


def article_data() -> tuple[torch.Tensor, torch.Tensor]:
    """The article's data, with its own calls on numpy's global RNG."""
    state = np.random.get_state()
    try:
        np.random.seed(0)
        X = np.random.randn(100, 1)
        y = 3 * X + 2 + 0.5 * np.random.randn(100, 1)
    finally:
        np.random.set_state(state)
    return torch.tensor(X, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


def article_linears(seed: int, depth: int, width: int, reinit=None, in_dim: int = 1, out_dim: int = 1) -> list[nn.Linear]:
    """torch.manual_seed(seed), then each nn.Linear built in order, re-initialised right after it is built."""
    torch.manual_seed(seed)
    dims = [in_dim] + [width] * depth + [out_dim]
    out = []
    for fi, fo in zip(dims[:-1], dims[1:]):
        lin = nn.Linear(fi, fo)
        if reinit is not None:
            reinit(lin.weight)
        out.append(lin)
    return out


class RefMLP(nn.Module):
    """The article's nn.Sequential, with optional norm layers and residual adds, hooks capturing every layer."""

    def __init__(self, linears: list[nn.Linear], activation: str, norm: str = "none", residual: bool = False):
        super().__init__()
        self.linears = nn.ModuleList(linears)
        width = linears[0].out_features
        depth = len(linears) - 1
        norm_cls = {"batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}.get(norm)
        self.norms = nn.ModuleList([norm_cls(width) for _ in range(depth)]) if norm_cls else None
        self.acts = nn.ModuleList([ACT[activation]() for _ in range(depth)])
        self.residual = residual
        self.outputs: list[torch.Tensor] = []
        self.act_inputs: list[torch.Tensor] = []
        self.act_outputs: list[torch.Tensor] = []

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        t.retain_grad()
        self.outputs.append(t)
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.outputs, self.act_inputs, self.act_outputs = [], [], []
        a = x
        for i, lin in enumerate(self.linears[:-1]):
            h = self._keep(lin(a))
            if self.norms is not None:
                h = self._keep(self.norms[i](h))
            self.act_inputs.append(h)
            z = self.acts[i](h)
            self.act_outputs.append(z)
            a = z + a if (self.residual and a.shape[-1] == z.shape[-1]) else z
        return self._keep(self.linears[-1](a))

    def stat_layers(self) -> list[nn.Module]:
        """The modules whose weight gets statistics, in gradsweep's layer order."""
        out = []
        for i, lin in enumerate(self.linears[:-1]):
            out.append(lin)
            if self.norms is not None:
                out.append(self.norms[i])
        return out + [self.linears[-1]]


def reference_training(model: RefMLP, x, y, steps: int, optim: str = "sgd", lr: float = 0.01, momentum: float = 0.0,
                       weight_decay: float = 0.0, clip_norm: float | None = None, activation: str = "relu",
                       batches=None) -> dict[str, np.ndarray]:
    """Train with torch.optim and clip_grad_norm_, reading every statistic off param.grad and tensor.grad."""
    if optim == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    rec: dict[str, list] = {k: [] for k in ("loss", "grad_norm", "clipped", "wgrad_norm", "wgrad_rms", "wgrad_max",
                                             "wgrad_zero_frac", "hgrad_norm", "weight_norm", "update_ratio", "out_rms",
                                             "act_rms", "saturated_frac", "dead_frac")}
    layers = model.stat_layers()
    for step in range(steps):
        xb, yb = (x, y) if batches is None else (x[batches[step]], y[batches[step]])
        opt.zero_grad()
        out = model(xb)
        loss = F.mse_loss(out, yb)
        loss.backward()
        w = [m.weight for m in layers]
        rec["loss"].append(loss.item())
        rec["wgrad_norm"].append([p.grad.norm().item() for p in w])
        rec["wgrad_rms"].append([p.grad.pow(2).mean().sqrt().item() for p in w])
        rec["wgrad_max"].append([p.grad.abs().max().item() for p in w])
        rec["wgrad_zero_frac"].append([(p.grad == 0).double().mean().item() for p in w])
        rec["hgrad_norm"].append([t.grad.norm().item() for t in model.outputs])
        rec["out_rms"].append([t.pow(2).mean().sqrt().item() for t in model.outputs])
        acts, sat, dead = [], [], []
        for i in range(len(model.act_outputs)):
            a = model.act_outputs[i]
            acts.append(a.pow(2).mean().sqrt().item())
            if activation == "sigmoid":
                sat.append(((a < 1e-2) | (a > 1 - 1e-2)).double().mean().item())
            elif activation == "tanh":
                sat.append((a.abs() > 1 - 1e-2).double().mean().item())
            if activation in ("relu", "leaky_relu", "prelu", "elu", "gelu", "selu"):
                dead.append((model.act_inputs[i] <= 0).all(dim=0).double().mean().item())
        rec["act_rms"].append(acts)
        rec["saturated_frac"].append(sat)
        rec["dead_frac"].append(dead)
        before = [p.detach().clone() for p in w]
        rec["weight_norm"].append([b.norm().item() for b in before])
        max_norm = float("inf") if clip_norm is None else clip_norm
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        rec["grad_norm"].append(total.item())
        rec["clipped"].append(bool(max_norm / (total.item() + 1e-6) < 1))
        opt.step()
        rec["update_ratio"].append([((p.detach() - b).norm() / b.norm()).item() for p, b in zip(w, before)])
    return {k: np.array(v, dtype=float) for k, v in rec.items()}
