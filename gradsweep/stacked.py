"""R small Linear layers at once on the CPU through gradsweep's own kernel (``csrc/stacked_linear.cpp``).

``torch.bmm`` and inductor's GEMM template treat each run's (B x in) by (in x out) product as one tiny GEMM; at a
depth sweep's widths (~10) the per-matrix overhead dominates (~2.5 GFLOP/s on a core that does ~45 on one large
GEMM). The kernel puts V = 8 runs side by side instead: each tile of 8 runs is transposed, in cache, so that one
SIMD register holds the same element of 8 runs, and every product is a plain vector FMA. Each run's arithmetic is
the same sequence of operations whatever its position in the group (its bits do not depend on its neighbours).

The kernel is built with the machine's C++ compiler (the one inductor needs for ``engine=compiled`` anyway) on
first use and cached by source, compiler and CPU in ``$GRADSWEEP_CACHE_DIR/kernels`` (default
``~/.cache/gradsweep/kernels``); a build takes a few seconds. It is exposed as the custom op
``gradsweep::stacked_linear`` with its backward, so ``torch.compile`` calls it as one opaque kernel.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-Wno-psabi")
OPENMP = "-fopenmp"  # tried first; a compiler without OpenMP (clang on macOS) builds the kernel single-threaded


def cache_dir() -> Path:
    root = os.environ.get("GRADSWEEP_CACHE_DIR") or str(Path.home() / ".cache" / "gradsweep")
    return Path(root) / "kernels"


def compiler() -> str | None:
    """The C++ compiler the kernel is built with: $CXX, else c++, g++ or clang++ on PATH."""
    for name in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the architecture, and the CPU's model and features (x86's "model name" and
    "flags", ARM's "CPU implementer", "CPU part" and "Features")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    keys = ("model name", "flags", "CPU implementer", "CPU part", "Features")
    keep = sorted({line for line in text.splitlines() if line.startswith(keys)})
    return "\n".join([platform.machine(), platform.processor(), *keep])


def source() -> bytes:
    return resources.files("gradsweep").joinpath("csrc/stacked_linear.cpp").read_bytes()


class KernelBuildError(RuntimeError):
    pass


@functools.cache
def library() -> ctypes.CDLL:
    """The built kernel, loaded (built first if this machine's cache lacks it). Raises KernelBuildError."""
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler ($CXX, c++, g++ or clang++) on PATH")
    src = source()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([src, cxx.encode(), version.encode(), _cpu_id().encode(),
                                     " ".join(FLAGS).encode()])).hexdigest()[:20]
    path = cache_dir() / f"stacked_linear-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            cpp, out = Path(tmp) / "stacked_linear.cpp", Path(tmp) / "k.so"
            cpp.write_bytes(src)
            errors = ""
            for extra in ((OPENMP,), ()):
                done = subprocess.run([cxx, *FLAGS, *extra, "-o", str(out), str(cpp)], capture_output=True, text=True)
                if done.returncode == 0:
                    break
                errors = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            else:
                raise KernelBuildError(f"{cxx} could not build gradsweep/csrc/stacked_linear.cpp: {errors[0]}")
            os.replace(out, path)  # atomic: a process beside this one sees the whole file or none
        log.info("built the stacked Linear kernel: %s", path)
    lib = ctypes.CDLL(str(path))
    f64, i64, cint = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for name in ("gs_forward_f32", "gs_forward_f64"):
        getattr(lib, name).argtypes = [f64, i64, f64, i64, f64, i64, f64, i64, i64, i64, i64, cint]
    for name in ("gs_backward_f32", "gs_backward_f64"):
        getattr(lib, name).argtypes = [f64, f64, i64, f64, i64, f64, f64, f64, i64, i64, i64, i64, cint]
    return lib


@functools.cache
def available() -> bool:
    """Whether the kernel can be used here (building it if needed); logs why not, once per process."""
    try:
        library()
    except KernelBuildError as e:
        log.warning("stacked Linear kernel unavailable (%s): the compiled engine uses bmm", e)
        return False
    return True


SUPPORTED = (torch.float32, torch.float64)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _runs(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """t with each run's part (all but the first axis) contiguous, and its run stride: 0 where one input serves every
    run, a row of the (R, P) parameter matrix for a weight (no copy either way)."""
    if not t[0].is_contiguous():
        t = t.contiguous()
    return t, (t.stride(0) if t.shape[0] > 1 else t[0].numel())


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           grad: torch.Tensor | None = None) -> None:
    """Shapes, dtypes and device as the kernel reads them (it has no bounds of its own), else a ValueError."""
    R, n_out, n_in = weight.shape if weight.dim() == 3 else (-1, -1, -1)
    B = x.shape[1] if x.dim() == 3 else -1
    want = {"x": (x, (R, B, n_in)), "bias": (bias, (R, n_out)), "grad": (grad, (R, B, n_out))}
    bad = [f"{name} {tuple(t.shape)} (expected {shape})" for name, (t, shape) in want.items()
           if t is not None and tuple(t.shape) != shape]
    if weight.dim() != 3 or R < 1 or bad:
        raise ValueError(f"gradsweep::stacked_linear: weight {tuple(weight.shape)} must be (R, out, in) with R >= 1"
                         + "".join(f"; {b}" for b in bad))
    given = [t for t in (x, weight, bias, grad) if t is not None]
    if any(t.dtype != weight.dtype or t.device.type != "cpu" for t in given):
        raise ValueError("gradsweep::stacked_linear: x, weight, bias and grad must share one dtype on the CPU; got "
                         + ", ".join(f"{t.dtype} on {t.device.type}" for t in given))


def _suffix(dtype: torch.dtype) -> str:
    if dtype not in SUPPORTED:
        raise TypeError(f"gradsweep::stacked_linear supports float32 and float64, not {dtype}")
    return "f32" if dtype == torch.float32 else "f64"


@torch.library.custom_op("gradsweep::stacked_linear", mutates_args=(), device_types="cpu")
def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (R, B, in), weight (R, out, in), bias (R, out) -> (R, B, out): ``baddbmm(bias, x, weight^T)`` per run."""
    _check(x, weight, bias)
    R, (B, n_in), n_out = weight.shape[0], x.shape[1:], weight.shape[1]
    (x, xs), (weight, ws), (bias, bs) = _runs(x), _runs(weight), _runs(bias)
    y = weight.new_empty(R, B, n_out)
    getattr(library(), f"gs_forward_{_suffix(weight.dtype)}")(
        _ptr(x), xs, _ptr(weight), ws, _ptr(bias), bs, _ptr(y), R, B, n_in, n_out, torch.get_num_threads())
    return y


@stacked_linear.register_fake
def _(x, weight, bias):
    return weight.new_empty(weight.shape[0], x.shape[1], weight.shape[1])


@torch.library.custom_op("gradsweep::stacked_linear_backward", mutates_args=(), device_types="cpu")
def stacked_linear_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            need_input: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx or an empty tensor, dL/dweight, dL/dbias) of :func:`stacked_linear` given dL/dy."""
    _check(x, weight, grad=grad)
    R, B, n_out = grad.shape
    n_in = weight.shape[2]
    grad = grad.contiguous()
    (x, xs), (weight, ws) = _runs(x), _runs(weight)
    dx = grad.new_empty(R, B, n_in) if need_input else grad.new_empty(0)
    dw, db = weight.new_empty(weight.shape), weight.new_empty(R, n_out)  # row-major, as the fake below says
    getattr(library(), f"gs_backward_{_suffix(weight.dtype)}")(
        _ptr(grad), _ptr(x), xs, _ptr(weight), ws, _ptr(dx) if need_input else None, _ptr(dw), _ptr(db), R, B, n_in, n_out,
        torch.get_num_threads())
    return dx, dw, db


@stacked_linear_backward.register_fake
def _(grad, x, weight, need_input):
    R, B, _ = grad.shape
    dx = grad.new_empty(R, B, weight.shape[2]) if need_input else grad.new_empty(0)
    return dx, weight.new_empty(weight.shape), weight.new_empty(R, weight.shape[1])


def _setup(ctx, inputs, output) -> None:
    x, weight, _ = inputs
    ctx.save_for_backward(x, weight)
    ctx.need_input = ctx.needs_input_grad[0]


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    dx, dw, db = stacked_linear_backward(grad, x, weight, ctx.need_input)
    return (dx if ctx.need_input else None), dw, db


stacked_linear.register_autograd(_backward, setup_context=_setup)
