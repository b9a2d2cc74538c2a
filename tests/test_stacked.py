"""gradsweep's CPU kernel for R Linear layers at once (gradsweep.engine.kernels.stacked): against torch's own bmm and autograd."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import scaled

from gradsweep.engine.compiled import has_cxx
from gradsweep.engine.kernels.build import SOURCES

pytestmark = pytest.mark.skipif(not has_cxx(), reason="needs a C++ compiler")

EPS32 = torch.finfo(torch.float32).eps


def _inputs(R, B, n_in, n_out, dtype, shared=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1 if shared else R, B, n_in, generator=g, dtype=dtype)
    x = x.expand(R, B, n_in) if shared else x
    W = torch.randn(R, n_out, n_in, generator=g, dtype=dtype)
    b = torch.randn(R, n_out, generator=g, dtype=dtype)
    return x, W, b


def _reference(x, W, b, dy):
    """y = baddbmm(b, x, W^T) and its gradients by autograd, in float64."""
    x, W, b = (t.detach().double().requires_grad_() for t in (x, W, b))
    y = torch.baddbmm(b.unsqueeze(1), x, W.transpose(1, 2))
    return (y.detach(), *torch.autograd.grad(y, (x, W, b), dy.double()))


def _ours(x, W, b, dy):
    from gradsweep.engine.kernels.stacked import stacked_linear

    x, W, b = (t.detach().requires_grad_() for t in (x, W, b))  # as laid out (strides kept)
    y = stacked_linear(x, W, b)
    return (y.detach(), *torch.autograd.grad(y, (x, W, b), dy))


# (R, B, in, out): partial tiles of 8 runs (13, 3), batches not a multiple of the kernel's 32-row chunks, widths
# split into uneven register passes (25 = 9 + 8 + 8), the article's 10 x 10, in = 1 (its first layer), a lone run
# (R = 1) and the stack of two a lone run trains as.
SHAPES = [(13, 37, 5, 17), (16, 100, 10, 10), (3, 4, 25, 2), (11, 40, 1, 10), (8, 1, 7, 13), (1, 5, 3, 4),
          (2, 33, 6, 9)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("shared", [False, True])
def test_float64_equals_bmm_and_autograd(shape, shared):
    x, W, b = _inputs(*shape, torch.float64, shared)
    dy = torch.randn(shape[0], shape[1], shape[3], dtype=torch.float64)
    ref, ours = _reference(x, W, b, dy), _ours(x, W, b, dy)
    names = ("y", "dL/dx", "dL/dW", "dL/db")
    # Sums of at most max(in, batch, out) float64 products, rounded in another order: a few ulps of the sum's terms.
    for name, r, o in zip(names, ref, ours, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12 * max(1.0, r.abs().max().item()), msg=name)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_float32_within_its_rounding(shape):
    """float32 against the float64 product: each output is a sum of n terms, so its error is bounded by
    n * eps32 * (the sum of the terms' magnitudes) (plus the inputs' own rounding, none here: they are exact)."""
    R, B, n_in, n_out = shape
    x, W, b = _inputs(R, B, n_in, n_out, torch.float32)
    dy = torch.randn(R, B, n_out)
    ref, ours = _reference(x, W, b, dy), _ours(x, W, b, dy)
    mags = (torch.baddbmm(b.abs().unsqueeze(1).double(), x.abs().double(), W.abs().transpose(1, 2).double()),
            torch.bmm(dy.abs().double(), W.abs().double()),
            torch.bmm(dy.abs().transpose(1, 2).double(), x.abs().double()),
            dy.abs().double().sum(1))
    terms = (n_in + 1, n_out, B, B)
    for name, r, o, m, n in zip(("y", "dL/dx", "dL/dW", "dL/db"), ref, ours, mags, terms, strict=True):
        err = (o.double() - r).abs()
        assert (err <= n * EPS32 * m + 1e-30).all(), (name, (err / (m + 1e-30)).max().item())


def test_a_runs_bits_do_not_depend_on_its_neighbours_or_threads():
    """Run r computed inside a group of 21, inside a reversed group, and with 1 or 2 threads: the same float32
    bits (every lane of a tile does the same operations; the tail tile's empty lanes are zeros)."""
    x, W, b = _inputs(21, 30, 10, 10, torch.float32)
    dy = torch.randn(21, 30, 10)
    base = _ours(x, W, b, dy)
    rev = _ours(x.flip(0), W.flip(0), b.flip(0), dy.flip(0))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ours(x, W, b, dy)
        torch.set_num_threads(2)
        two = _ours(x, W, b, dy)
    finally:
        torch.set_num_threads(threads)
    for a, r, o, t in zip(base, rev, one, two, strict=True):
        assert torch.equal(a, r.flip(0)) and torch.equal(o, t) and torch.equal(a, t)


def test_without_the_inputs_gradient():
    """A first layer's input is the data: its backward skips dL/dx and gives the same dL/dW and dL/db."""
    from gradsweep.engine.kernels.stacked import stacked_linear

    x, W, b = _inputs(13, 21, 4, 6, torch.float64, shared=True)
    dy = torch.randn(13, 21, 6, dtype=torch.float64)
    W, b = W.requires_grad_(), b.requires_grad_()
    y = stacked_linear(x, W, b)  # x does not require grad
    dW, db = torch.autograd.grad(y, (W, b), dy)
    full = _ours(x, W, b, dy)
    assert torch.equal(dW, full[2]) and torch.equal(db, full[3])


def test_inputs_it_cannot_read_are_refused():
    from gradsweep.engine.kernels.stacked import stacked_linear

    x, W, b = _inputs(4, 5, 3, 2, torch.float64)
    with pytest.raises(ValueError, match=r"x \(1, 5, 3\) \(expected \(4, 5, 3\)\)"):
        stacked_linear(x[:1], W, b)
    with pytest.raises(ValueError, match="bias"):
        stacked_linear(x, W, b[:, :1])
    with pytest.raises(ValueError, match="share one dtype"):
        stacked_linear(x.float(), W, b)


def test_the_op_passes_torchs_custom_op_checks():
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration, and that
    torch.compile's tracing sees what eager execution computes."""
    from gradsweep.engine.kernels.stacked import stacked_linear

    x, W, b = _inputs(9, 6, 4, 3, torch.float64)
    torch.library.opcheck(stacked_linear, (x.clone().requires_grad_(), W.requires_grad_(), b.requires_grad_()))
    torch.autograd.gradcheck(stacked_linear, (x.clone().requires_grad_(), W, b))


def test_non_contiguous_input_is_read_as_its_values():
    from gradsweep.engine.kernels.stacked import stacked_linear

    x, W, b = _inputs(10, 12, 6, 5, torch.float64)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (B, in) not row-major
    assert not xt.is_contiguous()
    torch.testing.assert_close(stacked_linear(xt, W, b), stacked_linear(x, W, b), rtol=0, atol=0)


def test_weights_read_in_place_from_the_parameter_matrix():
    """The engine's weights and biases are views of one (R, P) matrix (runs P values apart): read as they are."""
    from gradsweep.engine.kernels.stacked import stacked_linear

    x, W, b = _inputs(12, 9, 4, 6, torch.float64)
    flat = torch.cat([torch.randn(12, 3, dtype=torch.float64), W.reshape(12, -1), b], dim=1)
    Wv, bv = flat[:, 3:3 + 24].view(12, 6, 4), flat[:, 27:]
    assert Wv.stride(0) == flat.shape[1] and not Wv.is_contiguous()
    torch.testing.assert_close(stacked_linear(x, Wv, bv), stacked_linear(x, W, b), rtol=0, atol=0)
    dy = torch.randn(12, 9, 6, dtype=torch.float64)
    for a, r in zip(_ours(x, Wv, bv, dy), _ours(x, W, b, dy), strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


# Prints the Linear form a fresh process would train with (building the kernel if its cache lacks it).
PROBE = ("import logging, torch; logging.basicConfig(level=logging.INFO)\n"
         "from gradsweep.engine.compiled import linear_form\nprint(linear_form(torch.device('cpu')))\n")


def _probe(cache, **env):
    return subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=scaled(300),
                          env={**os.environ, "GRADSWEEP_CACHE_DIR": str(cache), **env})


def test_built_once_per_machine_then_loaded(tmp_path):
    # Two processes that need the kernel at once (a sweep's jobs on one node, pytest's workers): one builds it, the
    # other waits on the lock and loads it.
    env = {**os.environ, "GRADSWEEP_CACHE_DIR": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", PROBE], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=scaled(300)) for p in procs]
    assert [o[0].strip() for o in outs] == ["kernel", "kernel"], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert sum("built gradsweep's f32 CPU kernels" in err for _, err in outs) == 1
    built = list((tmp_path / "kernels").glob("stacked-*.so"))
    assert len(built) == 1 and "f32" in built[0].name  # float64's library is built on its first use, not here
    mtime = built[0].stat().st_mtime_ns
    again = _probe(tmp_path)
    assert again.stdout.strip() == "kernel" and "built gradsweep's" not in again.stderr
    assert built[0].stat().st_mtime_ns == mtime and list((tmp_path / "kernels").glob("*.so")) == built


def test_a_compiler_that_fails_falls_back_to_bmm_in_one_line(tmp_path):
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fake-cxx: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    out = _probe(tmp_path / "cache", CXX=str(fake))
    assert out.returncode == 0 and out.stdout.strip() == "bmm", out.stderr[-2000:]
    warned = [line for line in out.stderr.splitlines() if "CPU kernels are unavailable" in line]
    assert len(warned) == 1 and "cannot compile" in warned[0]
    assert not list((tmp_path / "cache" / "kernels").glob("*.so"))  # nothing half-written


# The statistics taken in the kernels (stacked_linear_stats, the backward's norms, layer_sums): against the
# definitions the eager engine computes them by (stats.py), in float64.

@pytest.mark.parametrize("shape", [(13, 37, 5, 17), (16, 100, 10, 10), (1, 5, 3, 4)])
def test_the_forward_moments_and_the_gradients_sums(shape):
    from gradsweep.engine.kernels.stacked import stacked_linear, stacked_linear_stats
    from gradsweep.engine.stats import small_scale

    R, B, n_in, n_out = shape
    x, W, b = _inputs(R, B, n_in, n_out, torch.float64)
    x[0, 0, 0] = float("nan")  # relu(NaN) is NaN, as torch.relu has it: run 0's moments are NaN, no other run's
    dy = torch.randn(R, B, n_out, dtype=torch.float64)
    _, scale = small_scale(torch.float64)
    token = torch.zeros(R, 2, dtype=torch.float64, requires_grad=True)
    xs, Ws, bs = (t.clone().requires_grad_() for t in (x, W, b))
    y, m = stacked_linear_stats(xs, Ws, bs, token, 1.0)
    torch.testing.assert_close(y, stacked_linear(x, W, b), rtol=0, atol=0, equal_nan=True)  # the same bits
    assert not m.requires_grad
    ref = torch.baddbmm(b.unsqueeze(1), x, W.transpose(1, 2))
    relu = torch.relu(ref)
    expected = torch.stack([(ref * ref).sum(1), relu.sum(1), (relu * relu).sum(1)], dim=1)
    torch.testing.assert_close(m, expected, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert m[0].isnan().all() and not m[1:].isnan().any()
    grads = torch.autograd.grad(y, (xs, Ws, bs, token), dy)
    plain = _ours(x, W, b, dy)[1:]
    for a, p in zip(grads[:3], plain, strict=True):  # taking the sums leaves the gradients' bits alone
        torch.testing.assert_close(a, p, rtol=0, atol=0, equal_nan=True)
    sq = dy.square().sum((1, 2))
    torch.testing.assert_close(grads[3], torch.stack([sq, sq], dim=1), rtol=1e-12, atol=0)
    # and with the scale that keeps a float32 gradient of 1e-30 from squaring to 0
    tiny = (dy * 1e-30).float()
    token32 = torch.zeros(R, 2, requires_grad=True)
    _, scale32 = small_scale(torch.float32)
    y32, _ = stacked_linear_stats(x.float().nan_to_num(), W.float(), b.float(), token32, scale32)
    (g32,) = torch.autograd.grad(y32, token32, tiny)
    assert (tiny.double().square().sum((1, 2)) < 1e-45).all()  # the plain sum: float32 has nothing that small
    torch.testing.assert_close(g32[:, 1].double().sqrt() / scale32, tiny.double().flatten(1).norm(dim=1), rtol=1e-5,
                               atol=0)


def test_the_stats_op_passes_torchs_custom_op_checks():
    from gradsweep.engine.kernels.stacked import layer_sums, stacked_linear_stats

    x, W, b = _inputs(9, 6, 4, 3, torch.float64)
    token = torch.zeros(9, 2, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(stacked_linear_stats, (x.clone().requires_grad_(), W.requires_grad_(), b.requires_grad_(),
                                                 token, 2.0))
    g = torch.randn(9, 30, dtype=torch.float64)
    torch.library.opcheck(layer_sums, (g, g * 2, g + 1, [0, 12], [10, 18], 2.0))
    with pytest.raises(ValueError, match="token"):
        stacked_linear_stats(x, W, b, token[:, :1], 1.0)
    with pytest.raises(ValueError, match="span"):
        layer_sums(g, g, g, [25], [10], 1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_layer_sums_equal_the_statistics_reductions(dtype):
    """One pass of layer_sums against StatsPlan.terms + per_weight (the eager engine's reductions) on the layout of a
    real network (depth 3, LayerNorm: weights of three sizes), with zeros, NaN and inf in the gradient."""
    from conftest import make_cfg

    from gradsweep.engine.kernels.stacked import layer_sums
    from gradsweep.engine.mlp import build_params, layers
    from gradsweep.engine.stats import StatsPlan

    cfg = make_cfg(model={"depth": 3, "width": 6, "norm": "layernorm"})
    stack = build_params(cfg.model, [cfg.init] * 19, list(range(19)), 3, 2, dtype, "cpu")
    plan = StatsPlan(stack.layout, layers(cfg.model), "relu", dtype, "cpu")
    gen = torch.Generator().manual_seed(0)
    grad, update = (torch.randn(stack.flat.shape, generator=gen, dtype=dtype) for _ in range(2))
    grad[0, plan.offsets[0]] = float("nan")
    grad[1, plan.offsets[1] + 3] = float("inf")
    grad[2] = 0.0
    grad[3, plan.offsets[2]:plan.offsets[2] + plan.numels[2]] *= 1e-30  # only the scaled sums see it in float32
    absg, terms = plan.terms(grad, update)
    sums = torch.stack([plan.per_weight(t, torch.sum) for t in (*terms, stack.flat * stack.flat)])
    gmax = plan.per_weight(absg, torch.amax)
    ours, ours_max = layer_sums(grad, update, stack.flat.detach(), plan.offsets, plan.numels, plan.scale)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(ours, sums, rtol=rtol, atol=0, equal_nan=True)
    assert torch.equal(ours_max.isnan(), gmax.isnan()) and torch.equal(ours_max.nan_to_num(), gmax.nan_to_num())
    assert torch.equal(ours[2:4], sums[2:4])  # the counts are exact


def test_outside_compile_the_same_kernels_without_the_custom_op_dispatch():
    # stacked.linear / linear_stats / sums call the kernels through autograd.Function outside torch.compile: the
    # same bits as the custom ops, gradients and the token's sums included.
    from gradsweep.engine.kernels import stacked

    x, W, b = _inputs(13, 37, 5, 17, torch.float32)
    dy = torch.randn(13, 37, 17)
    g, u, w = (torch.randn(13, 60) for _ in range(3))
    outs = []
    for use_op in (True, False):
        xs, Ws, bs = (t.clone().requires_grad_() for t in (x, W, b))
        token = torch.zeros(13, 2, requires_grad=True)
        y, m = (stacked.stacked_linear_stats(xs, Ws, bs, token, 8.0) if use_op
                else stacked.linear_stats(xs, Ws, bs, token, 8.0))
        y2 = stacked.stacked_linear(xs, Ws, bs) if use_op else stacked.linear(xs, Ws, bs)
        grads = torch.autograd.grad([y, y2], [xs, Ws, bs, token], [dy, dy])
        ls = (stacked.layer_sums if use_op else stacked.sums)(g, u, w, [0, 20], [20, 40], 8.0)
        outs.append((y, m, y2, *grads, *ls))
    for a, r in zip(*outs, strict=True):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


@pytest.mark.parametrize("engine", ["eager", "compiled"])
def test_a_run_does_not_import_torchs_compiler(engine, tmp_path):
    # The custom ops' first call imports torch._dynamo (~2 s); the eager engine calls the kernels without them, and
    # the compiled one, where the fused kernel applies (here), compiles nothing.
    code = ("import sys\nsys.path.insert(0, 'tests')\nfrom conftest import make_cfg\n"
            "from gradsweep.engine.train import train_group\n"
            f"t = train_group([make_cfg(model={{'depth': 3}}, train={{'steps': 3}}, engine={engine!r})])\n"
            "print(t.engine, 'torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(300),
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == [engine, "False"], out.stderr[-2000:]


def test_gradsweep_kernels_0_turns_them_off(tmp_path):
    out = _probe(tmp_path, GRADSWEEP_KERNELS="0")
    assert out.returncode == 0 and out.stdout.strip() == "bmm", out.stderr[-2000:]
    assert not (tmp_path / "kernels").exists()  # nothing built


def test_the_kernel_source_is_found_beside_a_gradsweep_folder_in_the_working_directory(tmp_path):
    # A sweep directory called gradsweep in the working directory: importlib.resources named it instead of the package
    # (the editable install's finder comes after the working directory on sys.path), and every job failed.
    (tmp_path / "gradsweep" / "csrc").mkdir(parents=True)
    code = ("import hashlib\nfrom gradsweep.engine.kernels.build import source\n"
            "from gradsweep.engine.programs import source_hash\n"
            "print(hashlib.sha256(source()).hexdigest(), len(source_hash()))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=scaled(120))
    csrc = Path(__file__).resolve().parent.parent / "gradsweep" / "engine" / "kernels" / "csrc"
    shipped = hashlib.sha256(b"\n".join((csrc / n).read_bytes() for n in SOURCES))
    assert out.stdout.split() == [shipped.hexdigest(), "64"], out.stderr[-2000:]


@pytest.mark.skipif(not has_cxx(), reason="no C++ compiler")
def test_a_failed_kernel_build_names_the_first_error_and_keeps_the_whole_output(tmp_path):
    """The compiler's last stderr line is often only "1 error generated" or a make-style summary: the message names
    the first error, and the whole output is kept next to where the library would have been."""
    from gradsweep.engine.kernels.build import KernelBuildError, _build, compiler

    src = b"int gs_forward_f32( {\nint also_broken = ;\n"
    with pytest.raises(KernelBuildError) as e:
        _build(compiler(), src, "_f32", tmp_path / "stacked-f32-x.so")
    message, log = str(e.value), tmp_path / "stacked-f32-x.log"
    assert "\n" not in message and "error" in message.split(": ", 1)[1] and str(log) in message, message
    assert log.read_text().count("error") >= 2 and not (tmp_path / "stacked-f32-x.so").exists()


def test_inductor_caches_under_gradsweep_cache_dir(tmp_path):
    code = ("import os; from gradsweep.engine.compiled import _prepare_inductor; _prepare_inductor(); "
            "print(os.environ['TORCHINDUCTOR_CACHE_DIR'])")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=scaled(300),
                         env={**env, "GRADSWEEP_CACHE_DIR": str(tmp_path)})
    assert out.returncode == 0 and out.stdout.strip() == str(tmp_path / "inductor"), out.stderr[-2000:]
