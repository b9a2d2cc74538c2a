"""The MLP, with its parameters stacked along a leading run axis.

Every parameter is a tensor of shape ``(R, ...)`` (R runs; ``train_group`` stacks a lone run with a copy),
and the forward pass uses batched matmuls, so R independent networks train as one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gradsweep.config.sections import PRELU_INIT, InitCfg, ModelCfg, linear_dims
from gradsweep.engine.init import apply_init

RELU_FAMILY = ("relu", "leaky_relu", "prelu", "elu", "gelu", "selu")
SATURATING = ("sigmoid", "tanh")
BN_EPS = 1e-5  # nn.BatchNorm1d's and nn.LayerNorm's default eps


@dataclass(frozen=True)
class Layer:
    """One row of the per-layer statistics: a Linear layer or a norm layer of block ``index`` (a module-built net,
    gradsweep.engine.nets: a Linear, Conv or norm layer, ``index`` its place in the forward pass)."""

    index: int
    """Block number, 1..depth for hidden blocks, depth + 1 for the readout (a module: 1, 2, ... in forward order)."""
    kind: str
    """'linear', 'conv' or 'norm'."""
    path: str | None = None
    """A module's layer: its dotted name in the module (``blocks.3.fc1``)."""

    @property
    def name(self) -> str:
        """The layer's name: the steps table's layer_name (``linear3``; a module's layer: its dotted path)."""
        if self.path is not None:
            return self.path or "(module)"  # the module itself (a bare nn.Linear as the whole net)
        return f"{self.kind}{self.index}"

    @property
    def weight_name(self) -> str:
        """Its weight's parameter name (in the stacked layout)."""
        return "weight" if self.path == "" else f"{self.name}.weight"


def layers(cfg: ModelCfg) -> list[Layer]:
    """The layers that get statistics, in forward order."""
    out = []
    for i in range(1, cfg.depth + 1):
        out.append(Layer(i, "linear"))
        if cfg.norm != "none":
            out.append(Layer(i, "norm"))
    out.append(Layer(cfg.depth + 1, "linear"))
    return out


def new_linear(fan_in: int, fan_out: int, init: InitCfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias ``nn.Linear(fan_in, fan_out)`` draws (its ``reset_parameters``, the same calls on
    the same RNG), then re-initialised by ``init``: without building a module, which costs more than the draw."""
    weight, bias = draw_linear(fan_in, fan_out)
    apply_init(weight, bias, init)
    return weight, bias


def draw_linear(fan_in: int, fan_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias ``nn.Linear(fan_in, fan_out)`` draws, as :func:`new_linear` takes them."""
    weight, bias = torch.empty(fan_out, fan_in), torch.empty(fan_out)
    # nn.init.kaiming_uniform_(weight, a=sqrt(5)) and nn.init.uniform_(bias, ...) as reset_parameters calls them,
    # their arithmetic spelled out: the same bounds, the same uniform_ calls (without their wrappers' ~50 us each,
    # which a 1,000-run group of the article's net pays 22,000 times).
    gain = math.sqrt(2.0 / (1 + math.sqrt(5) ** 2))
    weight.uniform_(-math.sqrt(3.0) * (gain / math.sqrt(fan_in)), math.sqrt(3.0) * (gain / math.sqrt(fan_in)))
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
    bias.uniform_(-bound, bound)
    return weight, bias


@dataclass(frozen=True)
class ParamMap:
    """Where each parameter lives along the flat axis of a (R, P) parameter matrix."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> ParamMap:
        offsets, pos = [], 0
        for t in tensors.values():
            offsets.append(pos)
            pos += t.numel()
        return cls(tuple(tensors), tuple(tuple(t.shape) for t in tensors.values()), tuple(offsets), pos)

    def span(self, name: str) -> slice:
        i = self.names.index(name)
        return slice(self.offsets[i], self.offsets[i] + math.prod(self.shapes[i]))


@dataclass
class Stack:
    """The parameters of R runs: one (R, P) matrix, and per parameter a (R, ...) view of it.

    The views are the autograd leaves; an in-place update of ``flat`` updates them all at once, so
    clipping and the optimiser act on one matrix however deep the network.
    """

    flat: torch.Tensor
    layout: ParamMap
    params: dict[str, torch.Tensor]

    @classmethod
    def of(cls, per_run: list[dict[str, torch.Tensor]], dtype: torch.dtype, device: torch.device | str) -> Stack:
        """The stack of R runs' parameters (each a dict, in one order and shape), in ``dtype`` on ``device``."""
        layout = ParamMap.of(per_run[0])
        flat = torch.stack([torch.cat([t.detach().reshape(-1) for t in p.values()]) for p in per_run]).to(
            device=device, dtype=dtype)
        R = flat.shape[0]
        params = {}
        for name, shape in zip(layout.names, layout.shapes):
            params[name] = flat[:, layout.span(name)].view(R, *shape).requires_grad_()
        return cls(flat, layout, params)


def build_params(
    cfg: ModelCfg,
    inits: list[InitCfg],
    seeds: list[int],
    in_dim: int,
    out_dim: int,
    dtype: torch.dtype,
    device: torch.device | str,
) -> Stack:
    """Draw the initial parameters of R runs and stack them on ``device``.

    Run r's layers are drawn exactly as the article's code draws them: ``torch.manual_seed(seeds[r])``,
    then each ``nn.Linear`` built in float32 in order and re-initialised by ``inits[r]`` right after it
    is built, before the next. Torch's global RNG is restored afterwards. The seed goes to the CPU generator, where
    the layers are drawn, alone: ``torch.manual_seed`` also queues a seed for every accelerator backend, which with
    none initialised records a stack trace each time, a cost per run that dominated a large group's setup.
    """
    per_run: list[dict[str, torch.Tensor]] = []
    dims = linear_dims(cfg, in_dim, out_dim)
    with torch.random.fork_rng(devices=[]):
        for init, seed in zip(inits, seeds, strict=True):
            torch.default_generator.manual_seed(seed)
            p: dict[str, torch.Tensor] = {}
            for i, (fan_in, fan_out) in enumerate(dims, start=1):
                p[f"linear{i}.weight"], p[f"linear{i}.bias"] = new_linear(fan_in, fan_out, init)
            per_run.append(p)
    for p in per_run:
        for i in range(1, cfg.depth + 1):
            if cfg.norm != "none":
                p[f"norm{i}.weight"] = torch.ones(cfg.width)
                p[f"norm{i}.bias"] = torch.zeros(cfg.width)
            if cfg.activation == "prelu":
                p[f"act{i}.weight"] = torch.full((1,), PRELU_INIT)
    return Stack.of(per_run, dtype, device)


def activate(x: torch.Tensor, name: str, prelu_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Apply activation ``name`` elementwise; PReLU takes a per-run slope of shape (R, 1)."""
    if name == "identity":
        return x
    if name == "prelu":
        # F.prelu's formula, max(0, x) + w * min(0, x), with one slope per run.
        w = prelu_weight.view(-1, *([1] * (x.dim() - 1)))
        return torch.clamp(x, min=0) + w * torch.clamp(x, max=0)
    if name == "leaky_relu":
        return F.leaky_relu(x)
    return getattr(torch, name)(x) if name in ("sigmoid", "tanh", "relu") else getattr(F, name)(x)


def normalize(x: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """BatchNorm (training mode: this batch's statistics, per run) or LayerNorm on x of shape (R, B, W)."""
    dim = 1 if kind == "batchnorm" else 2
    mean = x.mean(dim=dim, keepdim=True)
    var = x.var(dim=dim, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + BN_EPS) * weight.unsqueeze(1) + bias.unsqueeze(1)


@dataclass
class Forward:
    """What one forward pass leaves behind for the statistics."""

    out: torch.Tensor
    """Network output, (R, B, out)."""
    outputs: list[torch.Tensor]
    """Each layer's output (Linear: its pre-activation h_l; norm: its normalised output), in ``layers`` order."""
    act_inputs: list[torch.Tensor]
    """Per hidden block, what the activation received (R, B, W)."""
    acts: list[torch.Tensor]
    """Per hidden block, the activation's output (before the residual add)."""


LINEAR_FORMS = ("baddbmm", "bmm", "kernel")


def linear(a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, form: str = "baddbmm") -> torch.Tensor:
    """R Linear layers at once: a (R, B, in), weight (R, out, in), bias (R, out) -> (R, B, out).

    The same sum in three forms, rounded in different orders: ``baddbmm`` (one fused call, the eager engine's),
    ``bmm`` and then the bias added (the form inductor's GEMM template compiles: the compiled engine on CUDA), and
    ``kernel``: gradsweep's own CPU kernel, 8 runs per SIMD register (:mod:`gradsweep.engine.kernels.stacked`; the compiled
    engine on the CPU).
    """
    if form == "kernel":
        from gradsweep.engine.kernels import stacked

        return stacked.linear(a, weight, bias)
    if form == "bmm":
        return torch.bmm(a, weight.transpose(1, 2)) + bias.unsqueeze(1)
    return torch.baddbmm(bias.unsqueeze(1), a, weight.transpose(1, 2))


def forward(params: dict[str, torch.Tensor], cfg: ModelCfg, x: torch.Tensor,
            probe: Callable[[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None], None] | None = None,
            *, tap: Callable[[int, torch.Tensor], torch.Tensor] | None = None, linear_form: str = "baddbmm",
            tapped_linear: Callable[..., torch.Tensor] | None = None) -> Forward:
    """Run R networks on their inputs x of shape (R, B, in).

    ``probe``, if given, sees each block as soon as it is computed (while its tensors are still in cache):
    ``probe(outputs, act_input, act)`` with the block's layer outputs, and for hidden blocks what the
    activation received and returned (None for the readout).
    ``tap``, if given, replaces each layer output h by ``tap(k, h)`` (k: its row in ``layers`` order), for a
    caller that cannot hook the outputs (a compiled step: an identity whose backward also reduces dL/dh).
    ``linear_form``: see :func:`linear`. ``tapped_linear``, if given, computes each Linear layer's output itself
    in place of ``linear`` and ``tap``: ``tapped_linear(k, a, weight, bias)`` (the compiled engine's kernel that
    takes the statistics as it goes).
    """
    outputs, act_inputs, acts = [], [], []
    k = 0

    def shifted(h: torch.Tensor) -> torch.Tensor:
        nonlocal k
        if tap is not None:
            h = tap(k, h)
        k += 1
        return h

    def lin(a: torch.Tensor, i: int) -> torch.Tensor:
        nonlocal k
        weight, bias = params[f"linear{i}.weight"], params[f"linear{i}.bias"]
        if tapped_linear is None:
            return shifted(linear(a, weight, bias, linear_form))
        k += 1
        return tapped_linear(k - 1, a, weight, bias)

    a = x
    for i in range(1, cfg.depth + 1):
        h = lin(a, i)
        block = [h]
        if cfg.norm != "none":
            h = shifted(normalize(h, cfg.norm, params[f"norm{i}.weight"], params[f"norm{i}.bias"]))
            block.append(h)
        outputs += block
        act_inputs.append(h)
        z = activate(h, cfg.activation, params.get(f"act{i}.weight"))
        acts.append(z)
        if probe is not None:
            probe(block, h, z)
        a = z + a if (cfg.residual and a.shape[-1] == z.shape[-1]) else z
    out = lin(a, cfg.depth + 1)
    outputs.append(out)
    if probe is not None:
        probe([out], None, None)
    return Forward(out, outputs, act_inputs, acts)
