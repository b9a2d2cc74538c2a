"""R small Linear layers at once on the CPU through gradsweep's own kernels (``csrc/stacked.cpp``).

``torch.bmm`` and inductor's GEMM template treat each run's (B x in) by (in x out) product as one tiny GEMM; at a
depth sweep's widths (~10) the per-matrix overhead dominates (~2.5 GFLOP/s on a core that does ~45 on one large
GEMM). The kernel puts V = 8 runs side by side instead: each tile of 8 runs is transposed, in cache, so that one
SIMD register holds the same element of 8 runs, and every product is a plain vector FMA. Each run's arithmetic is
the same sequence of operations whatever its position in the group (its bits do not depend on its neighbours).

Both engines train through it on the CPU (the eager one runs the compiled engine's step programs op by op,
:func:`gradsweep.engine.compiled.runs_programs`). The kernel is built with the machine's C++ compiler (the one inductor
needs for ``engine=compiled`` anyway) on first use, one library per dtype (seconds each, once per
machine), and cached by source, compiler and CPU in ``$GRADSWEEP_CACHE_DIR/kernels`` (default
``~/.cache/gradsweep/kernels``). Without a compiler, both engines use ``torch.bmm``/``baddbmm`` instead. It is
exposed as the custom op ``gradsweep::stacked_linear`` with its backward, so ``torch.compile`` calls it as one
opaque kernel.

The statistics of a compiled step are taken in the same kernels, where the tensors are already in registers or
cache, instead of in passes of their own over every (R, B, w) layer output and gradient (each such pass costs about
what the layer's product does at these widths): ``gradsweep::stacked_linear_stats`` is the Linear that also returns
each output unit's moments (sum over the batch of y^2, relu(y), relu(y)^2) and hands back, as the gradient of a
``token``, each run's sum of (dL/dy)^2; ``gradsweep::layer_sums`` takes every per-weight reduction of the
statistics in one pass over the gradient, update and weight matrices.
"""

from __future__ import annotations

from typing import Any

import torch

from gradsweep.engine.kernels.build import library

SUPPORTED = (torch.float32, torch.float64)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _runs(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t with each run's part (all but the first axis) contiguous, and its run stride: 0 where one input serves every
    run, a row of the (R, P) parameter matrix for a weight (no copy either way). From the strides (indexing t[0]
    makes a view: microseconds that count at a few runs, where a step is ~20 kernel calls)."""
    shape, stride = t.shape, t.stride()
    size = 1
    for d in range(len(shape) - 1, 0, -1):
        if shape[d] != 1 and stride[d] != size:
            t = t.contiguous()
            stride = t.stride()
            break
        size *= shape[d]
    return t, (stride[0] if shape[0] > 1 else size)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           grad: torch.Tensor | None = None) -> None:
    """Shapes, dtypes and device as the kernel reads them (it has no bounds of its own), else a ValueError."""
    if weight.dim() == 3 and x.dim() == 3 and weight.shape[0] >= 1:
        R, n_out, n_in = weight.shape
        B = x.shape[1]
        dtype = weight.dtype
        if (x.shape == (R, B, n_in) and (bias is None or bias.shape == (R, n_out))
                and (grad is None or grad.shape == (R, B, n_out)) and weight.is_cpu and x.is_cpu and x.dtype == dtype
                and (bias is None or (bias.is_cpu and bias.dtype == dtype))
                and (grad is None or (grad.is_cpu and grad.dtype == dtype))):
            return  # the common case, in a few comparisons; otherwise the error below says what is wrong
    R, n_out, n_in = weight.shape if weight.dim() == 3 else (-1, -1, -1)
    B = x.shape[1] if x.dim() == 3 else -1
    want = {"x": (x, (R, B, n_in)), "bias": (bias, (R, n_out)), "grad": (grad, (R, B, n_out))}
    bad = [f"{name} {tuple(t.shape)} (expected {shape})" for name, (t, shape) in want.items()
           if t is not None and tuple(t.shape) != shape]
    if weight.dim() != 3 or R < 1 or bad:
        raise ValueError(f"gradsweep::stacked_linear: weight {tuple(weight.shape)} must be (R, out, in) with R >= 1"
                         + "".join(f"; {b}" for b in bad))
    _one_dtype_on_cpu("stacked_linear", "x, weight, bias and grad", [t for t in (x, weight, bias, grad) if t is not None])


def _check_token(token: torch.Tensor, weight: torch.Tensor) -> None:
    """stacked_linear_stats' token is (R, 2): its gradient is each run's two sums of (dL/dy)^2."""
    if token.shape != (weight.shape[0], 2):
        raise ValueError(f"gradsweep::stacked_linear_stats: token {tuple(token.shape)} (expected ({weight.shape[0]}, 2))")


def _one_dtype_on_cpu(op: str, names: str, given: list[torch.Tensor]) -> None:
    """A ValueError unless every tensor the kernel ``op`` reads shares one dtype on the CPU."""
    if any(t.dtype != given[0].dtype or t.device.type != "cpu" for t in given):
        raise ValueError(f"gradsweep::{op}: {names} must share one dtype on the CPU; got "
                         + ", ".join(f"{t.dtype} on {t.device.type}" for t in given))


def _suffix(dtype: torch.dtype) -> str:
    if dtype not in SUPPORTED:
        raise TypeError(f"gradsweep::stacked_linear supports float32 and float64, not {dtype}")
    return "f32" if dtype == torch.float32 else "f64"


_FNS: dict[tuple[str, torch.dtype], Any] = {}


def _fn(op: str, dtype: torch.dtype):
    fn = _FNS.get((op, dtype))
    if fn is None:
        suffix = _suffix(dtype)
        fn = _FNS[op, dtype] = getattr(library(suffix), f"gs_{op}_{suffix}")
    return fn


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, moments: bool
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check(x, weight, bias)
    R, (B, n_in), n_out = weight.shape[0], x.shape[1:], weight.shape[1]
    (x, xs), (weight, ws), (bias, bs) = _runs(x), _runs(weight), _runs(bias)
    y = weight.new_empty(R, B, n_out)
    m = weight.new_empty(R, 3, n_out) if moments else None
    _fn("forward", weight.dtype)(
        _ptr(x), xs, _ptr(weight), ws, _ptr(bias), bs, _ptr(y), _ptr(m), R, B, n_in, n_out, torch.get_num_threads())
    return y, m


@torch.library.custom_op("gradsweep::stacked_linear", mutates_args=(), device_types="cpu")
def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (R, B, in), weight (R, out, in), bias (R, out) -> (R, B, out): ``baddbmm(bias, x, weight^T)`` per run."""
    return _forward(x, weight, bias, False)[0]


@stacked_linear.register_fake
def _(x, weight, bias):
    return weight.new_empty(weight.shape[0], x.shape[1], weight.shape[1])


@torch.library.custom_op("gradsweep::stacked_linear_stats", mutates_args=(), device_types="cpu")
def stacked_linear_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, token: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`stacked_linear`'s y, and its moments (R, 3, out): per output unit the sums over the batch of y^2,
    relu(y) and relu(y)^2 (relu(NaN) = NaN, as torch.relu). ``token`` (R, 2) is not read; its gradient is each run's
    (sum of (dL/dy)^2, sum of (dL/dy * scale)^2) (stats.safe_norm's two sums)."""
    _check_token(token, weight)
    return _forward(x, weight, bias, True)


@stacked_linear_stats.register_fake
def _(x, weight, bias, token, scale):
    R, n_out = weight.shape[:2]
    return weight.new_empty(R, x.shape[1], n_out), weight.new_empty(R, 3, n_out)


def _backward_impl(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input: bool, norms: bool,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check(x, weight, grad=grad)
    R, B, n_out = grad.shape
    n_in = weight.shape[2]
    grad = grad.contiguous()
    (x, xs), (weight, ws) = _runs(x), _runs(weight)
    dx = grad.new_empty(R, B, n_in) if need_input else grad.new_empty(0)
    dw, db = weight.new_empty(weight.shape), weight.new_empty(R, n_out)  # row-major, as the fake below says
    gsq = grad.new_empty(R, 2) if norms else grad.new_empty(0)
    _fn("backward", weight.dtype)(
        _ptr(grad), _ptr(x), xs, _ptr(weight), ws, _ptr(dx) if need_input else None, _ptr(dw), _ptr(db),
        _ptr(gsq) if norms else None, scale, R, B, n_in, n_out, torch.get_num_threads())
    return dx, dw, db, gsq


@torch.library.custom_op("gradsweep::stacked_linear_backward", mutates_args=(), device_types="cpu")
def stacked_linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input: bool,
                            norms: bool = False, scale: float = 1.0
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx or an empty tensor, dL/dweight, dL/dbias, and with ``norms`` each run's (R, 2) sums of (dL/dy)^2 and
    (dL/dy * scale)^2, else an empty tensor) of :func:`stacked_linear` given dL/dy."""
    return _backward_impl(grad, x, weight, need_input, norms, scale)


@stacked_linear_backward.register_fake
def _(grad, x, weight, need_input, norms=False, scale=1.0):
    R, B, _ = grad.shape
    dx = grad.new_empty(R, B, weight.shape[2]) if need_input else grad.new_empty(0)
    gsq = grad.new_empty(R, 2) if norms else grad.new_empty(0)
    return dx, weight.new_empty(weight.shape), weight.new_empty(R, weight.shape[1]), gsq


def _setup(ctx, inputs, output) -> None:
    x, weight = inputs[:2]
    ctx.save_for_backward(x, weight)
    ctx.need_input = ctx.needs_input_grad[0]
    ctx.norms = len(inputs) > 3 and ctx.needs_input_grad[3]
    ctx.scale = inputs[4] if len(inputs) > 4 else 1.0
    if isinstance(output, tuple):
        ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw, db, gsq = stacked_linear_backward(grad, x, weight, ctx.need_input, ctx.norms, ctx.scale)
    return (dx if ctx.need_input else None), dw, db, (gsq if ctx.norms else None)


def _backward_stats(ctx, grad, _moments):  # the moments are not differentiable
    return (*_backward(ctx, grad), None)


stacked_linear.register_autograd(lambda ctx, grad: _backward(ctx, grad)[:3], setup_context=_setup)
stacked_linear_stats.register_autograd(_backward_stats, setup_context=_setup)


def _layer_sums(grad: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, offsets: list[int], numels: list[int],
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    R, P = weight.shape
    if (grad.shape != weight.shape or update.shape != weight.shape or len(offsets) != len(numels)
            or any(o < 0 or n < 1 or o + n > P for o, n in zip(offsets, numels))):
        raise ValueError(f"gradsweep::layer_sums: grad {tuple(grad.shape)}, update {tuple(update.shape)} and weight "
                         f"{tuple(weight.shape)} must be one (R, P) shape and each span inside [0, P)")
    _one_dtype_on_cpu("layer_sums", "grad, update and weight", [grad, update, weight])
    grad, update, weight = grad.contiguous(), update.contiguous(), weight.contiguous()
    off, num = torch.tensor(offsets, dtype=torch.int64), torch.tensor(numels, dtype=torch.int64)
    L = len(offsets)
    sums, gmax = weight.new_empty(7, R, L), weight.new_empty(R, L)
    _fn("layer_sums", weight.dtype)(
        _ptr(grad), _ptr(update), _ptr(weight), _ptr(off), _ptr(num), _ptr(sums), _ptr(gmax), scale, R, P, L,
        torch.get_num_threads())
    return sums, gmax


@torch.library.custom_op("gradsweep::layer_sums", mutates_args=(), device_types="cpu")
def layer_sums(grad: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, offsets: list[int], numels: list[int],
               scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per run and per span ``weight[:, offsets[k]:offsets[k] + numels[k]]`` of the (R, P) matrices: the sums of
    grad^2, (grad * scale)^2, [grad != 0], [grad not finite], update^2, (update * scale)^2 and weight^2, (7, R, L),
    and the largest |grad| (NaN where one is), (R, L): stats.StatsPlan's per-weight reductions in one pass."""
    return _layer_sums(grad, update, weight, offsets, numels, scale)


@layer_sums.register_fake
def _(grad, update, weight, offsets, numels, scale):
    R, L = weight.shape[0], len(offsets)
    return weight.new_empty(7, R, L), weight.new_empty(R, L)


# Outside torch.compile the kernels are called through a plain autograd.Function instead of the custom ops: the same
# functions on the same tensors (the same bits, tests/test_stacked.py), without the custom-op dispatch (tens of
# microseconds a call) and without importing torch._dynamo on the first call (~2 s a process: a custom op's CPU
# implementation is wrapped in dynamo's "disable"), which the eager engine would otherwise pay in every process.

class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, token, scale):
        y, m = _forward(x, weight, bias, token is not None)
        ctx.save_for_backward(x, weight)
        ctx.norms, ctx.scale = token is not None and ctx.needs_input_grad[3], scale
        if m is None:
            m = y.new_empty(0)
        ctx.mark_non_differentiable(m)
        return y, m

    @staticmethod
    def backward(ctx, grad, _moments):
        x, weight = ctx.saved_tensors
        need_input = ctx.needs_input_grad[0]
        dx, dw, db, gsq = _backward_impl(grad, x, weight, need_input, ctx.norms, ctx.scale)
        return (dx if need_input else None), dw, db, (gsq if ctx.norms else None), None


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`stacked_linear`: the custom op inside torch.compile, else the same kernel through autograd.Function."""
    if torch.compiler.is_compiling():
        return stacked_linear(x, weight, bias)
    return _Linear.apply(x, weight, bias, None, 1.0)[0]


def linear_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, token: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`stacked_linear_stats`, dispatched as :func:`linear`."""
    if torch.compiler.is_compiling():
        return stacked_linear_stats(x, weight, bias, token, scale)
    _check_token(token, weight)
    return _Linear.apply(x, weight, bias, token, scale)


def sums(grad: torch.Tensor, update: torch.Tensor, weight: torch.Tensor, offsets: list[int], numels: list[int],
         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`layer_sums`, dispatched as :func:`linear`."""
    if torch.compiler.is_compiling():
        return layer_sums(grad, update, weight, offsets, numels, scale)
    return _layer_sums(grad, update, weight, offsets, numels, scale)
