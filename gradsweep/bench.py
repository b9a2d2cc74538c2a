"""``python -m gradsweep.bench``: run-steps per second with and without statistics, side by side.

Every row trains the article's net (depth 10, width 10, ReLU, 100 points, full-batch SGD) on the
same device in the same process; "run-steps/s" is optimiser steps of one run per second, summed
over the runs trained together. The plain-PyTorch row is the article's own loop, for scale.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from gradsweep.config import build_run_cfg
from gradsweep.data import make_data
from gradsweep.train import train_group


def _plain_loop(steps: int, depth: int, width: int, device: str) -> None:
    x, y = make_data(build_run_cfg({}).data)
    x, y = x.to(device), y.to(device)
    mods: list[nn.Module] = []
    for i in range(depth):
        mods += [nn.Linear(1 if i == 0 else width, width), nn.ReLU()]
    model = nn.Sequential(*mods, nn.Linear(width, 1)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = nn.MSELoss()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
    if device == "cuda":
        torch.cuda.synchronize()


def _cfgs(runs: int, steps: int, depth: int, width: int, log_every: int, device: str):
    return [build_run_cfg({"model": {"depth": depth, "width": width}, "optim": {"lr": 0.01 * (1 + r % 7)},
                           "train": {"steps": steps, "seed": r, "log_every": log_every}, "device": device, "quiet": True})
            for r in range(runs)]


def _time(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--width", type=int, default=10)
    ap.add_argument("--group", type=int, default=100, help="runs in the stacked-group rows")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    s, d, w, dev = args.steps, args.depth, args.width, args.device

    nostats_1 = "gradsweep, 1 run, no statistics"
    nostats_g = f"gradsweep, {args.group} runs stacked, no statistics"
    # (name, runs trained together, the row it is compared with for the cost of statistics, function)
    rows: list[tuple[str, int, str | None, Callable[[], None]]] = [
        ("plain PyTorch loop (the article's), no statistics", 1, None, lambda: _plain_loop(s, d, w, dev)),
        (nostats_1, 1, None, lambda: train_group(_cfgs(1, s, d, w, 1, dev), collect_stats=False)),
        ("gradsweep, 1 run, statistics every step", 1, nostats_1, lambda: train_group(_cfgs(1, s, d, w, 1, dev))),
        ("gradsweep, 1 run, statistics every 10 steps", 1, nostats_1, lambda: train_group(_cfgs(1, s, d, w, 10, dev))),
        (nostats_g, args.group, None, lambda: train_group(_cfgs(args.group, s, d, w, 1, dev), collect_stats=False)),
        (f"gradsweep, {args.group} runs stacked, statistics every step", args.group, nostats_g,
         lambda: train_group(_cfgs(args.group, s, d, w, 1, dev))),
    ]
    cpu = platform.processor() or platform.machine()
    print(f"gradsweep bench: depth {d}, width {w}, {s} steps, device {dev} ({cpu}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, median of {args.repeats} rounds, rows interleaved in each round")
    for _, _, _, fn in rows:  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name, *_ in rows}
    for _ in range(args.repeats):  # interleaved, so that drift in machine speed hits every row alike
        for name, _, _, fn in rows:
            times[name].append(_time(fn, 1))
    rate = {name: runs * s / statistics.median(times[name]) for name, runs, _, _ in rows}
    base = rate[rows[0][0]]
    print(f"{'path':58s} {'run-steps/s':>12s} {'vs plain loop':>14s} {'vs no statistics':>17s}")
    for name, _, ref, _ in rows:
        vs = f"{rate[name] / rate[ref]:16.2f}x" if ref else f"{'':17s}"
        print(f"{name:58s} {rate[name]:12,.0f} {rate[name] / base:13.2f}x {vs}")


if __name__ == "__main__":
    main()
