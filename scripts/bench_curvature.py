"""What the sharpness costs: one Lanczos iteration (a Hessian-vector product of the whole group) against one
training step of the same group, side by side in one process.

The article's net by default (depth 10, width 10, ReLU, 100 points, full-batch SGD, per-run lr), R runs in one
group, float32. Rows, timed in interleaved rounds (median):

- a training step with every statistic, by the eager engine and by the default CPU engine (the fused kernel);
- one iteration of the measurement (the measurement's time over the products it took: one double-backward HVP of
  the group's summed loss, and the small tridiagonal eigenproblem of every run);
- the whole measurement at step 0, with its iterations (median and max over runs).

    python scripts/bench_curvature.py [--runs 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from gradsweep.bench import run_lr
from gradsweep.config.sections import build_run_cfg
from gradsweep.engine import train
from gradsweep.engine.data import load_data


def group(runs: int, depth: int, width: int, engine: str):
    cfgs = [build_run_cfg({"model": {"depth": depth, "width": width}, "optim": {"lr": run_lr(r)}, "quiet": True,
                           "engine": engine, "train": {"steps": 1000, "seed": r}}) for r in range(runs)]
    g = train._plan(cfgs)
    data = load_data(g.first.data)
    x, y = g.on_device(data.x), g.on_device(data.y)
    return g, train._build(g, x.shape[1], data.out_dim, True, x), x, y


def step_seconds(g, net, x, y, steps: int) -> float:
    R = len(g.cfgs)
    xs, ys = x.expand(R, *x.shape), y.expand(R, *y.shape)
    alive = torch.ones(R, dtype=torch.bool)
    diverged = torch.full((R,), -1, dtype=torch.long)
    reason = torch.zeros(R, dtype=torch.long)
    net.step(xs, ys, alive, diverged, reason, True)  # warm
    t0 = time.perf_counter()
    for _ in range(steps):
        alive, diverged, reason, _, _ = net.step(xs, ys, alive, diverged, reason, True)
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--width", type=int, default=10)
    p.add_argument("--steps", type=int, default=20, help="training steps timed per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    eager = group(args.runs, args.depth, args.width, "eager")
    fused = group(args.runs, args.depth, args.width, "compiled")
    measure = group(args.runs, args.depth, args.width, "eager")
    rows: dict[str, list[float]] = {"eager step": [], f"{fused[0].engine} step": [], "measurement": [],
                                    "one iteration": []}
    iters = None
    for _ in range(args.rounds):
        rows["eager step"].append(step_seconds(*eager, args.steps))
        rows[f"{fused[0].engine} step"].append(step_seconds(*fused, args.steps))
        t0 = time.perf_counter()
        s = train._sharpness(*measure)
        took = time.perf_counter() - t0
        iters = s.iters.numpy()
        rows["measurement"].append(took)
        rows["one iteration"].append(took / int(iters.max()))
    med = {k: statistics.median(v) for k, v in rows.items()}
    print(f"R = {args.runs} runs, depth {args.depth}, width {args.width}, float32, {torch.get_num_threads()} "
          f"threads; median of {args.rounds} rounds")
    for k, v in med.items():
        print(f"  {k:<16} {v * 1e3:9.1f} ms")
    print(f"  iterations: median {int(np.median(iters))}, max {int(iters.max())} (tol {measure[0].first.stats.sharpness_tol:g})")
    for k in ("eager step", f"{fused[0].engine} step"):
        print(f"  one iteration / {k}: {med['one iteration'] / med[k]:.2f}x; the measurement: "
              f"{med['measurement'] / med[k]:.0f} steps")


if __name__ == "__main__":
    main()
