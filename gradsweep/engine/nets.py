"""Networks built as ``nn.Module`` s: the built-in ``model=cnn`` and ``model=resmlp``, and your own (``model=custom``,
``model.net`` in Hydra's instantiate convention); what gradsweep records of them (:func:`describe`).

A module-built run is drawn as a user's script would draw it: ``torch.manual_seed(train.seed)``, the module built,
then every ``nn.Linear`` and ``nn.Conv1d/2d/3d`` re-initialised by the run's init scheme in module order
(:func:`init_module`). Statistics are taken at every Linear and Conv layer and every norm layer with a weight, in the
order the forward pass calls them (:class:`NetInfo`).
"""

from __future__ import annotations

import importlib
import inspect
import math
import os
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from gradsweep.config.identity import as_tuple
from gradsweep.config.sections import ACTIVATIONS, ConfigError, InitCfg, ModelCfg, first_line
from gradsweep.engine.init import apply_init
from gradsweep.engine.mlp import Layer, layers

ACT_MODULES: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "prelu": nn.PReLU,
    "elu": nn.ELU, "gelu": nn.GELU, "selu": nn.SELU, "identity": nn.Identity,
}
assert set(ACT_MODULES) == set(ACTIVATIONS)
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # re-initialised, and the signal ratio's ends
# Recorded when they have a weight. Private: _NormBase is the one base class of BatchNorm1d/2d/3d, their lazy and
# sync forms and InstanceNorm1d/2d/3d; torch exports none public.
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
# The built-in activations a recognised nn.Sequential MLP may use (their nn defaults: what gradsweep.engine.mlp computes).
_PLAIN_ACTS = {cls: name for name, cls in ACT_MODULES.items() if name != "prelu"}  # PReLU: a parameter of its own


class ConvNet(nn.Module):
    """``model=cnn``: ``depth`` 3x3 conv layers of ``width`` channels (same padding) on the inputs as one-channel
    square images (digits: 8x8), each followed by its norm and activation, with a skip around each layer whose input
    has ``width`` channels (``residual``); then a Linear readout of the flattened map."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 4, width: int = 8, activation: str = "relu",
                 residual: bool = False, norm: str = "none"):
        super().__init__()
        side = math.isqrt(in_dim)
        if side * side != in_dim or side < 3:
            raise ConfigError(f"model=cnn needs square one-channel images of at least 3x3 (its 3x3 kernels): data has "
                              f"{in_dim} features, not such a square number (data=digits: 64, 8x8)")
        self.side, self.residual = side, residual
        self.convs = nn.ModuleList([nn.Conv2d(1 if i == 0 else width, width, 3, padding=1) for i in range(depth)])
        self.norms = nn.ModuleList([_norm(norm, width, image=True) for _ in range(depth)])
        self.acts = nn.ModuleList([ACT_MODULES[activation]() for _ in range(depth)])
        self.head = nn.Linear(width * in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], 1, self.side, self.side)
        for conv, norm, act in zip(self.convs, self.norms, self.acts):
            z = act(norm(conv(h)))
            h = z + h if self.residual and h.shape == z.shape else z
        return self.head(h.flatten(1))


class ResBlock(nn.Module):
    """x + fc2(act(fc1(norm(x)))): a pre-norm residual block (without ``residual``: the branch alone)."""

    def __init__(self, width: int, activation: str, norm: str, residual: bool = True):
        super().__init__()
        self.norm = _norm(norm, width, image=False)
        self.fc1, self.act, self.fc2 = nn.Linear(width, width), ACT_MODULES[activation](), nn.Linear(width, width)
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.fc2(self.act(self.fc1(self.norm(x))))
        return x + branch if self.residual else branch


class ResMLP(nn.Module):
    """``model=resmlp``: a Linear from the inputs to ``width`` units, ``depth`` pre-norm residual blocks
    (:class:`ResBlock`; ``residual: false`` drops the skip, leaving a plain 2 x depth-layer MLP), a final norm and a
    Linear readout."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 4, width: int = 32, activation: str = "relu",
                 residual: bool = True, norm: str = "layernorm"):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList([ResBlock(width, activation, norm, residual) for _ in range(depth)])
        self.norm = _norm(norm, width, image=False)
        self.head = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def _norm(kind: str, width: int, image: bool) -> nn.Module:
    if kind == "batchnorm":
        return nn.BatchNorm2d(width) if image else nn.BatchNorm1d(width)
    if kind == "layernorm":
        return nn.GroupNorm(1, width) if image else nn.LayerNorm(width)
    return nn.Identity()


BUILT_IN: dict[str, type[nn.Module]] = {"cnn": ConvNet, "resmlp": ResMLP}


def _target(model: ModelCfg) -> Any:
    """model.net's ``_target_``, imported (the working directory first on the path, as ``python -m`` has it): the
    longest prefix that is a module, then attributes; any failure one line naming the target and the error."""
    name = model.net["_target_"]
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    parts = name.split(".")
    try:
        for i in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ModuleNotFoundError as e:  # this prefix is not a module: a shorter one may be (a module missing
                # elsewhere, imported by the user's module, is the user's error)
                if i == 1 or e.name is None or not (".".join(parts[:i]) + ".").startswith(e.name + "."):
                    raise
        for attr in parts[i:]:
            obj = getattr(obj, attr)
    except Exception as e:  # noqa: BLE001 - any import failure is the user's target's: one line naming it
        raise ConfigError(f"model.net._target_={name!r} does not import: {type(e).__name__}: {first_line(e)}") from None
    return obj


def _arguments(model: ModelCfg, fn: Any, in_dim: int, out_dim: int) -> dict[str, Any]:
    """model.net's arguments for ``fn``, with in_dim / out_dim added where ``fn`` takes them; an argument ``fn`` does
    not take is a one-line error listing those it does."""
    name = model.net["_target_"]
    args = {k: v for k, v in model.net.items() if k != "_target_"}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return args
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in args:
        if key not in named and not takes_any and not key.startswith("_"):
            raise ConfigError(f"model.net.{key} is not an argument of {name}; valid arguments: {', '.join(named)}")
    for key, value in (("in_dim", in_dim), ("out_dim", out_dim)):
        if key in named and key not in args:
            args[key] = value
    return args


def build_net(model: ModelCfg, in_dim: int, out_dim: int) -> nn.Module:
    """A new module of ``model`` for data of ``in_dim`` features and ``out_dim`` outputs (on the CPU, float32)."""
    if model.name in BUILT_IN:
        return BUILT_IN[model.name](in_dim, out_dim, depth=model.depth, width=model.width,
                                    activation=model.activation, residual=model.residual, norm=model.norm)
    fn = _target(model)
    args = _arguments(model, fn, in_dim, out_dim)
    name = model.net["_target_"]
    try:
        if _instantiated(args):  # Hydra's own keys (_args_, _recursive_, ...) or nested _target_ nodes
            from hydra.utils import instantiate

            net = instantiate({"_target_": name, **args})
        else:
            net = fn(**args)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's constructor failed: one line naming it and why
        why = " ".join(str(e).split())  # one line, with the cause a nested instantiate wraps
        raise ConfigError(f"model.net: {name}({', '.join(f'{k}={v!r}' for k, v in args.items())}) raised "
                          f"{type(e).__name__}: {why[:400]}") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model.net._target_={name!r} returned a {type(net).__name__}, not a torch.nn.Module")
    if any(is_lazy(p) for p in net.parameters()):  # lazy layers take their shapes from a first batch, as in a script
        net.eval()
        try:
            with torch.no_grad():
                net(torch.zeros(2, in_dim))
        except Exception as e:  # noqa: BLE001 - one line, as describe's
            raise ConfigError(f"model.net: {name} fails on a batch of the data's inputs (2, {in_dim}): "
                              f"{type(e).__name__}: {first_line(e)}") from None
        finally:
            net.train()
    return net


def _instantiated(node: Any) -> bool:
    """Whether building ``node`` needs ``hydra.utils.instantiate``: a key of Hydra's own or a ``_target_`` anywhere."""
    if isinstance(node, dict):
        return any(str(k).startswith("_") or _instantiated(v) for k, v in node.items())
    if isinstance(node, (list, tuple)):
        return any(_instantiated(v) for v in node)
    return False


def init_module(net: nn.Module, init: InitCfg) -> None:
    """Re-initialise every trained Linear and Conv layer of ``net`` in module order by ``init`` (weight, and bias per
    init.bias); a frozen one (``requires_grad=False``) keeps what its constructor gave it."""
    for module in net.modules():
        if isinstance(module, WEIGHT_LAYERS) and module.weight.requires_grad:
            apply_init(module.weight, module.bias, init)


@dataclass(frozen=True)
class NetInfo:
    """What gradsweep records of a module-built net, found by forward passes of a throwaway copy."""

    layers: tuple[Layer, ...]
    """The recorded layers, those with a trainable weight: Linear/Conv ('linear', 'conv') and norm layers ('norm'),
    in the order a forward pass of zeros calls them, any it does not call placed after the called layer before it in
    module order; ``index`` 1, 2, ... in that order, ``path`` the module's dotted name."""
    out_shapes: tuple[tuple[int, ...] | None, ...]
    """Per layer, its output's shape for one sample; None for a layer the forward pass of zeros did not call."""
    batch_axes: tuple[int, ...]
    """Per layer, the axis of its output that is the batch (0 but for sequence-first layers)."""
    n_params: int
    """Trained parameters of one run's module."""
    mlp: ModelCfg | None
    """The built-in MLP the module computes, where it is an nn.Sequential of Linear layers and one plain
    activation (trained through the built-in engines); else None."""
    one_sample: str | None
    """Why its forward pass in training mode fails on a batch of one sample (BatchNorm needs two), as one line;
    None where it does not."""


def describe(model: ModelCfg, in_dim: int, out_dim: int) -> NetInfo:
    """:class:`NetInfo` of ``model``'s module; a one-line :class:`ConfigError` where it cannot be trained here (no
    Linear or Conv layer, an output of the wrong shape, a target that does not build)."""
    key = (as_tuple(model), in_dim, out_dim)
    if key not in _DESCRIBED:
        _DESCRIBED[key] = _describe(model, in_dim, out_dim)
    return _DESCRIBED[key]


_DESCRIBED: dict[tuple, NetInfo] = {}


def check_batch(model: ModelCfg, in_dim: int, out_dim: int, batch_size: int | None) -> None:
    """Where a training step sees one sample (``train.batch_size=1``; ``data.n_samples`` is at least 2), a module
    whose forward pass refuses one sample (:attr:`NetInfo.one_sample`) is a one-line error naming the key. Nothing to
    do for the MLP, whose norm the schema checks."""
    if batch_size != 1 or model.name == "mlp":
        return
    refused = describe(model, in_dim, out_dim).one_sample
    if refused:
        raise ConfigError(f"train.batch_size=1 is not valid with {net_name(model)}, which fails on a batch of one "
                          f"sample ({refused}); it must be null or >= 2")


def net_name(model: ModelCfg) -> str:
    """How messages name a module-built net: its target (custom), else ``model=<name>``."""
    return model.net["_target_"] if model.name == "custom" else f"model={model.name}"


def layer_count(model: ModelCfg, in_dim: int, out_dim: int) -> int:
    """How many layers a run of ``model`` records (the MLP's, or a module's: :func:`describe`)."""
    return len(layers(model)) if model.name == "mlp" else len(describe(model, in_dim, out_dim).layers)


def _describe(model: ModelCfg, in_dim: int, out_dim: int) -> NetInfo:
    name = net_name(model)
    with torch.random.fork_rng(devices=[]):
        net = build_net(model, in_dim, out_dim)
    paths = {m: p for p, m in net.named_modules()}
    watched = _watched(net, paths, name)
    # two batch sizes: the dimension of each output that follows the batch is its batch axis
    calls = {batch: _forward_calls(net, watched, batch, in_dim, out_dim, name) for batch in (2, 3)}
    _check_calls(calls[2], paths, name)
    order, shapes, axes = _batch_axes(calls, paths, name)
    _add_uncalled(watched, order, shapes, axes)
    layers = tuple(Layer(k + 1, "norm" if isinstance(m, NORM_LAYERS) else "linear" if isinstance(m, nn.Linear)
                         else "conv", paths[m]) for k, m in enumerate(order))
    n_params = sum(p.numel() for p in net.parameters() if p.requires_grad)
    try:  # in training mode, as runs train: BatchNorm takes its statistics from the batch
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            net.train()(torch.zeros(1, in_dim))
        one_sample = None
    except Exception as e:  # noqa: BLE001 - kept as one line, for check_batch
        one_sample = f"{type(e).__name__}: {first_line(e)}"
    return NetInfo(layers, tuple(shapes), tuple(axes), n_params, as_mlp(net, in_dim), one_sample)


def _watched(net: nn.Module, paths: dict[nn.Module, str], name: str) -> list[nn.Module]:
    """The trainable Linear, Conv and norm layers, in module order; a shared or computed weight is refused."""
    owners: dict[int, list[str]] = {}
    for pname, p in net.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    shared = next((names for names in owners.values() if len(names) > 1), None)
    if shared:
        raise ConfigError(f"model.net: {name} shares one parameter between {shared[0]!r} and {shared[1]!r}; gradsweep "
                          "trains and records each layer's own parameters: give each layer its own")
    watched = []
    for m in net.modules():
        weight = getattr(m, "weight", None)
        if not (isinstance(m, WEIGHT_LAYERS) or (isinstance(m, NORM_LAYERS) and weight is not None)):
            continue
        if not isinstance(weight, nn.Parameter):
            raise ConfigError(f"model.net: {name}'s layer {paths[m] or type(m).__name__!r} has a computed weight (a "
                              "parametrization such as weight_norm), not a parameter; gradsweep records a layer's "
                              "weight parameter")
        if weight.requires_grad:  # a frozen layer is not trained: nothing to record
            watched.append(m)
    return watched


def _check_calls(calls: list[tuple[nn.Module, tuple[int, ...]]], paths: dict[nn.Module, str], name: str) -> None:
    """Each layer called once in a forward pass, and a Linear or Conv among them."""
    seen: dict[nn.Module, int] = {}
    for module, _ in calls:
        seen[module] = seen.get(module, 0) + 1
    twice = [(paths[m], n) for m, n in seen.items() if n > 1]
    if twice:
        raise ConfigError(f"model.net: {name} calls layer {twice[0][0]!r} {twice[0][1]} times in one forward pass; "
                          "gradsweep records each layer once: give each use its own module")
    if not any(isinstance(m, WEIGHT_LAYERS) for m, _ in calls):
        raise ConfigError(f"model.net: {name} has no trainable nn.Linear or nn.Conv layer in its forward pass; "
                          "gradsweep measures the gradient that reaches those")


def _batch_axes(calls: dict[int, list], paths: dict[nn.Module, str], name: str) -> tuple[list, list, list]:
    """The called layers in call order, each output's shape without its batch axis, and that axis."""
    shapes: list[tuple[int, ...] | None] = []
    axes = []
    for (m, two), (_, three) in zip(calls[2], calls[3]):
        moved = [i for i, (a, b) in enumerate(zip(two, three)) if a != b]
        if len(two) != len(three) or len(moved) != 1 or (two[moved[0]], three[moved[0]]) != (2, 3):
            raise ConfigError(f"model.net: {name}'s layer {paths[m]!r} gives {two} for a batch of 2 and {three} for 3: "
                              "gradsweep needs one axis of each layer's output to be the batch")
        axes.append(moved[0])
        shapes.append(two[:moved[0]] + two[moved[0] + 1:])
    return [m for m, _ in calls[2]], shapes, axes


def _add_uncalled(watched: list[nn.Module], order: list, shapes: list, axes: list) -> None:
    """The layers the pass did not call (a branch other runs may take), their shapes unknown: each inserted right
    after the last called layer that comes before it in module order."""
    called = set(order)
    for i, m in enumerate(watched):
        if m not in called:
            before = [order.index(p) for p in watched[:i] if p in order]
            at = max(before) + 1 if before else 0
            order.insert(at, m)
            shapes.insert(at, None)
            axes.insert(at, 0)


def _forward_calls(net: nn.Module, watched: list[nn.Module], batch: int, in_dim: int, out_dim: int,
                   name: str) -> list[tuple[nn.Module, tuple[int, ...]]]:
    """The watched layers the forward pass of a batch of zeros calls, in order, with their outputs' shapes."""
    calls: list[tuple[nn.Module, tuple[int, ...]]] = []

    def record(module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            calls.append((module, tuple(output.shape)))

    handles = [m.register_forward_hook(record) for m in watched]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            out = net(torch.zeros(batch, in_dim))
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's forward pass failed on the data's shape: one line
        raise ConfigError(f"model.net: {name} fails on a batch of the data's inputs ({batch}, {in_dim}): "
                          f"{type(e).__name__}: {first_line(e)}") from None
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch, out_dim):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"model.net: {name} returns {shape} for inputs ({batch}, {in_dim}); the data needs "
                          f"({batch}, {out_dim})")
    return calls


def as_mlp(net: nn.Module, in_dim: int) -> ModelCfg | None:
    """The built-in MLP that ``net`` computes, where it is an ``nn.Sequential`` of Linear layers (with bias, trained)
    of one hidden width, each but the last followed by one plain activation of one kind (nn defaults); else None."""
    if type(net) is not nn.Sequential or len(net) < 3 or len(net) % 2 == 0:
        return None
    linears, acts = list(net)[0::2], list(net)[1::2]
    if not all(type(m) is nn.Linear and m.bias is not None for m in linears) or \
            not all(p.requires_grad for p in net.parameters()):
        return None
    kinds = {type(a) for a in acts}
    if len(kinds) != 1 or (kind := kinds.pop()) not in _PLAIN_ACTS:
        return None
    a = acts[0]
    if (kind is nn.LeakyReLU and a.negative_slope != 0.01) or (kind is nn.ELU and a.alpha != 1.0) or \
            (kind is nn.GELU and a.approximate != "none"):
        return None
    width = linears[0].out_features
    if linears[0].in_features != in_dim or any(m.in_features != width for m in linears[1:]) or \
            any(m.out_features != width for m in linears[:-1]):
        return None
    return ModelCfg(depth=len(acts), width=width, activation=_PLAIN_ACTS[kind])
