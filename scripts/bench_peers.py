"""gradsweep against the ways a user could train the same sweep of small nets: run-steps per second side by side.

Rows (article shape: depth 10, width 10, ReLU, 100 points, full-batch SGD, per-run lr; R runs, S steps):
the plain loop (nn.Sequential + torch.optim.SGD, one run at a time, timed on a subset and scaled), torch.func
(vmap(functional_call) forward + autograd.grad, per-run lr), JAX (jit(lax.scan(vmap(value_and_grad))), when
installed), and gradsweep's eager and compiled engines with and without statistics (on the CPU compiled is the fused
kernel; one more row shows the torch.compile'd step programs that norm-layer nets compile instead). Rows are
interleaved in every round; the median is reported. Compile time is reported apart: first use in this process, and
a fresh process with the caches warm. The last lines compare the paths' final losses (median, and runs that part
ways).

    python scripts/bench_peers.py [--runs 1000] [--steps 200] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

from gradsweep.bench import _cfgs, article_data, article_net, run_lr
from gradsweep.engine.train import train_group


def plain_loop(runs: int, steps: int, depth: int, width: int, device: str = "cpu") -> torch.Tensor:
    x, y = article_data(device)
    finals = []
    for r in range(runs):
        torch.manual_seed(r)
        model = article_net(depth, width, device)
        opt = torch.optim.SGD(model.parameters(), lr=run_lr(r))
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        finals.append(nn.functional.mse_loss(model(x), y).detach())
    return torch.stack(finals).cpu()


def torch_func(runs: int, steps: int, depth: int, width: int, device: str = "cpu") -> torch.Tensor:
    from torch.func import functional_call, stack_module_state, vmap

    x, y = article_data(device)
    models = []
    for r in range(runs):
        torch.manual_seed(r)
        models.append(article_net(depth, width, device))
    params, _ = stack_module_state(models)
    base = models[0].to("meta")
    lr = torch.tensor([run_lr(r) for r in range(runs)], device=device)

    def loss_of(p):
        return nn.functional.mse_loss(functional_call(base, p, (x,)), y)

    batched = vmap(loss_of)
    names = list(params)
    for _ in range(steps):
        leaves = [params[n].detach().requires_grad_() for n in names]
        losses = batched(dict(zip(names, leaves)))
        grads = torch.autograd.grad(losses.sum(), leaves)
        with torch.no_grad():
            params = {n: p - lr.view(-1, *([1] * (p.dim() - 1))) * g for n, p, g in zip(names, leaves, grads)}
    with torch.no_grad():
        return batched(params).cpu()


def jax_rows(runs: int, steps: int, depth: int, width: int):
    """(name, fn) rows for JAX, with and without weight-gradient norms; None when JAX is not installed."""
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        return None
    x, y = (jnp.asarray(t.numpy()) for t in article_data("cpu"))
    dims = [1] + [width] * depth + [1]
    key = jax.random.PRNGKey(0)
    params = []
    for fi, fo in zip(dims[:-1], dims[1:]):
        key, k1, k2 = jax.random.split(key, 3)
        bound = 1 / fi**0.5
        params.append((jax.random.uniform(k1, (runs, fi, fo), minval=-bound, maxval=bound),
                       jax.random.uniform(k2, (runs, fo), minval=-bound, maxval=bound)))
    lr = jnp.asarray([run_lr(r) for r in range(runs)])

    def loss_fn(p):
        a = x
        for i, (w, b) in enumerate(p):
            a = a @ w + b
            if i < len(p) - 1:
                a = jax.nn.relu(a)
        return jnp.mean((a - y) ** 2)

    def make(norms: bool):
        def step(p, _):
            loss, g = jax.vmap(jax.value_and_grad(loss_fn))(p)
            new = jax.tree_util.tree_map(lambda q, gq: q - lr.reshape((-1,) + (1,) * (q.ndim - 1)) * gq, p, g)
            out = (loss, jnp.stack([jnp.sqrt(jnp.sum(w**2, axis=(1, 2))) for w, _ in g], axis=1)) if norms else loss
            return new, out

        run = jax.jit(lambda p: jax.lax.scan(step, p, None, length=steps))
        t0 = time.perf_counter()
        jax.block_until_ready(run(params))
        compile_s = time.perf_counter() - t0

        def fn():
            new, out = run(params)
            jax.block_until_ready(new)
            return torch.from_numpy(__import__("numpy").asarray(jax.vmap(loss_fn)(new)))
        return fn, compile_s

    return [("JAX jit(scan(vmap(value_and_grad))), no statistics", *make(False)),
            ("JAX, + per-layer weight-gradient norms", *make(True))]


def _gradsweep(runs, steps, depth, width, engine: str, stats: bool, device: str = "cpu"):
    def fn():
        cfgs = _cfgs(runs, steps, depth, width, 1, device)
        cfgs = [dataclasses.replace(c, engine=engine) for c in cfgs]
        return torch.from_numpy(train_group(cfgs, collect_stats=stats).final_loss)
    return fn


def _patched(module: str, name: str, value):
    """fn -> fn run with gradsweep's ``module.name`` replaced by ``value`` (restored after)."""
    def wrap(fn):
        def wrapped():
            import importlib

            mod = importlib.import_module(f"gradsweep.{module}")
            old = getattr(mod, name)
            setattr(mod, name, value)
            try:
                return fn()
            finally:
                setattr(mod, name, old)
        return wrapped
    return wrap


# As on a machine without a C++ compiler: eager trains through train_group's own loop (baddbmm, statistics through a
# probe and hooks), as every eager run did before the eager engine ran the step programs.
_without_kernel = _patched("compiled", "linear_form", lambda device: "bmm")
# engine=compiled as norm-layer nets get it on the CPU: torch.compile'd step programs instead of the fused kernel.
_not_fused = _patched("fused", "applies", lambda *args: False)


def warm_compile_s(runs: int, depth: int, width: int, device: str) -> float:
    """Seconds to the first compiled step in a fresh process (inductor's caches warm), less its eager twin's."""
    code = ("import dataclasses, time, torch; torch.set_num_threads(1)\n"
            "from gradsweep.bench import _cfgs, article_net\nfrom gradsweep.engine.train import train_group\n"
            f"c = _cfgs({runs}, 2, {depth}, {width}, 1, {device!r})\n"
            "for e in ('eager', 'compiled'):\n"
            "    t0 = time.perf_counter(); train_group([dataclasses.replace(x, engine=e) for x in c])\n"
            "    print(e, time.perf_counter() - t0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    t = dict(zip(out[0::2], map(float, out[1::2])))
    return t["compiled"] - t["eager"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--width", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (JAX rows: CPU only)")
    ap.add_argument("--plain-runs", type=int, default=20, help="runs the plain loop trains (its rate is per run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import os
    os.environ["GRADSWEEP_THREADS"] = str(args.threads)  # gradsweep's own thread choice would override the row's
    R, S, d, w, dev = args.runs, args.steps, args.depth, args.width, args.device
    rows = [(f"plain loop, nn.Sequential + optim.SGD, one run at a time ({args.plain_runs} runs)", args.plain_runs,
             lambda: plain_loop(args.plain_runs, S, d, w, dev)),
            ("torch.func vmap(functional_call) + autograd.grad, per-run lr", R, lambda: torch_func(R, S, d, w, dev)),
            ("gradsweep eager, no statistics", R, _gradsweep(R, S, d, w, "eager", False, dev)),
            ("gradsweep eager, all statistics every step", R, _gradsweep(R, S, d, w, "eager", True, dev))]
    if dev == "cpu":
        rows.append(("gradsweep eager without the kernel (baddbmm loop), all statistics", R,
                     _without_kernel(_gradsweep(R, S, d, w, "eager", True, dev))))
    compile_s = {}
    compiled_rows = [(f"gradsweep compiled, {'all statistics every step' if stats else 'no statistics'}",
                      _gradsweep(R, S, d, w, "compiled", stats, dev)) for stats in (False, True)]
    if dev == "cpu":
        compiled_rows.append(("gradsweep torch.compile'd step programs (not fused), all statistics",
                              _not_fused(_gradsweep(R, S, d, w, "compiled", True, dev))))
    for name, fn in compiled_rows:
        t0 = time.perf_counter()
        fn()
        compile_s[name] = time.perf_counter() - t0
        rows.append((name, R, fn))
    jax = jax_rows(R, S, d, w) if dev == "cpu" else None
    if jax is None:
        print("JAX: not installed, its rows skipped (pip install jax to add them)")
    else:
        for name, fn, cs in jax:
            compile_s[name] = cs
            rows.append((name, R, fn))
    finals: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {name: [] for name, _, _ in rows}
    for _ in range(args.rounds):
        for name, _, fn in rows:
            t0 = time.perf_counter()
            finals[name] = fn()
            times[name].append(time.perf_counter() - t0)
    rate = {name: runs * S / statistics.median(times[name]) for name, runs, _ in rows}
    eager = rate["gradsweep eager, all statistics every step"]
    print(f"bench_peers: R = {R:,} runs, depth {d}, width {w}, {S} steps, {args.threads} torch thread(s), "
          f"device {dev}, torch {torch.__version__}, median of {args.rounds} interleaved rounds")
    print(f"{'path':72s} {'run-steps/s':>12s} {'vs eager+stats':>15s}")
    for name, _, _ in rows:
        print(f"{name:72s} {rate[name]:12,.0f} {rate[name] / eager:14.2f}x")
    stats_cost = rate["gradsweep compiled, no statistics"] / rate["gradsweep compiled, all statistics every step"] - 1
    print(f"compiled: statistics cost {stats_cost:+.0%} over compiled without them")
    for name, cs in compile_s.items():
        steady = statistics.median(times[name])
        print(f"compile, first use in this process: {name}: {max(0.0, cs - steady):.1f} s")
    warm = warm_compile_s(R, d, w, dev)
    print(f"compile, a fresh process with the caches warm (first compiled step less eager's): {warm:.1f} s")
    first = compile_s["gradsweep compiled, all statistics every step"]
    steady = statistics.median(times["gradsweep compiled, all statistics every step"])
    ten = (first + 9 * steady) / (10 * steady)
    print(f"a 10-group sweep of this shape, compiled with statistics, compile amortised: "
          f"{10 * R * S / (first + 9 * steady):,.0f} run-steps/s ({ten:.2f}x the steady time)")
    # Runs whose learning rate sits at the edge of stability amplify any rounding difference exponentially (in
    # float64 too: 4e-16 at step 0 becomes 1e-9 at step 120 and 0.6 at 160 for some runs of this sweep), so the
    # paths are compared by their typical run and by how many runs part ways, not by the worst one.
    ref_all = finals["gradsweep eager, all statistics every step"].double()
    for name in finals:
        if name.startswith("JAX") or name == "gradsweep eager, all statistics every step":  # JAX: its own init
            continue
        f = finals[name].double()
        ref = ref_all[:len(f)]
        both = f.isfinite() & ref.isfinite()
        rel = ((f - ref).abs() / ref.abs())[both]
        print(f"final loss vs gradsweep eager+stats, {len(f)} runs: median relative difference {rel.median().item():.1e}, "
              f"90th percentile {rel.quantile(0.9).item():.1e}, {int((rel > 1e-3).sum())} apart by > 1e-3, "
              f"{int((f.isfinite() != ref.isfinite()).sum())} diverged in one only  {name}")

if __name__ == "__main__":
    main()
