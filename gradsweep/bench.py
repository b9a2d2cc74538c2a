"""``python -m gradsweep.bench``: run-steps per second with and without statistics, side by side.

Every row trains the article's net (depth 10, width 10, ReLU, 100 points, full-batch SGD) on the
same device in the same process; "run-steps/s" is optimiser steps of one run per second, summed
over the runs trained together. The plain-PyTorch row is the article's own loop, for scale.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gradsweep.config.sections import build_run_cfg
from gradsweep.engine.data import make_data
from gradsweep.engine.train import train_group


def article_net(depth: int, width: int, device: str) -> nn.Sequential:
    """The article's net as its own code builds it: nn.Linear + ReLU blocks, then the readout (torch's global RNG)."""
    mods: list[nn.Module] = []
    for i in range(depth):
        mods += [nn.Linear(1 if i == 0 else width, width), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(width, 1)).to(device)


def article_data(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The default data set (the article's), on ``device``."""
    x, y = make_data(build_run_cfg({}).data)
    return x.to(device), y.to(device)


def run_lr(r: int) -> float:
    """The learning rate of the benchmarks' run ``r``: seven values, in turn."""
    return 0.01 * (1 + r % 7)


def _plain_loop(steps: int, depth: int, width: int, device: str) -> None:
    x, y = article_data(device)
    model = article_net(depth, width, device)
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
    return [build_run_cfg({"model": {"depth": depth, "width": width}, "optim": {"lr": run_lr(r)},
                           "train": {"steps": steps, "seed": r, "log_every": log_every}, "device": device, "quiet": True})
            for r in range(runs)]


def _time(fn: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


LRS = "0.001,0.002,0.005,0.01,0.02,0.05,0.1,0.2,0.5,1.0"
CLIPS = "null,0.1,1,10,100"


def _cli_sweep(args: list[str], sweep_dir: Path) -> float:
    """Run ``python -m gradsweep -m ...`` end to end; return its wall-clock seconds."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gradsweep", "-m", *args, "quiet=true", f"hydra.sweep.dir={sweep_dir}"],
                   check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def _training_s(sweep_dir: Path) -> float:
    """Seconds spent inside train_group: every run of a group records the group's wall_s."""
    from gradsweep.results.store import load_runs

    runs = load_runs(sweep_dir)
    return float(runs.drop_duplicates(["wall_s", "group_size"])["wall_s"].sum())


def sweep_bench(steps: int, basic_runs: int, out: Path) -> None:
    """The same sweep end to end from the command line: Hydra's basic launcher (a stated subset, scaled
    linearly) against the fused default; per-job overhead from two fused sweep sizes."""
    full = [f"optim.lr={LRS}", f"train.clip_norm={CLIPS}", "init=default,xavier,kaiming,large", "train.seed=range(0,5)",
            f"train.steps={steps}"]
    # 100 runs with the same group choices as the full sweep (so the same composed templates): the
    # difference between the two is what 900 more jobs cost.
    small = ["optim.lr=" + ",".join(LRS.split(",")[:5]), f"train.clip_norm={CLIPS}", "init=default,xavier,kaiming,large",
             "train.seed=0", f"train.steps={steps}"]
    subset = [f"optim.lr={LRS}", f"train.clip_norm={CLIPS}", "init=kaiming", "train.seed=0", f"train.steps={steps}"]
    subset = subset if basic_runs >= 50 else [f"optim.lr={LRS}", "train.clip_norm=null", "init=kaiming",
                                              "train.seed=0", f"train.steps={steps}"]
    n_full, n_small, n_basic = 1000, 100, 50 if basic_runs >= 50 else 10
    shutil.rmtree(out, ignore_errors=True)
    basic_s = _cli_sweep([*subset, "hydra/launcher=basic", "hydra/sweeper=basic"], out / "basic")
    fused_small_s = _cli_sweep(small, out / "fused-small")
    fused_s = _cli_sweep(full, out / "fused")
    basic_train = _training_s(out / "basic")
    fused_train = _training_s(out / "fused")
    per_job = ((fused_s - fused_train) - (fused_small_s - _training_s(out / "fused-small"))) / (n_full - n_small)
    basic_scaled = basic_s * n_full / n_basic
    print(f"\nend to end, {n_full:,} runs x {steps} steps (10 lr x 5 clip x 4 init x 5 seeds), article shape, "
          f"statistics every step, from the command line:")
    print(f"{'path':52s} {'wall s':>9s} {'run-steps/s':>12s} {'non-training s/run':>19s}")
    print(f"{f'hydra/launcher=basic ({n_basic} runs, x{n_full // n_basic} linear)':52s} {basic_scaled:9.1f} "
          f"{n_full * steps / basic_scaled:12,.0f} {(basic_s - basic_train) / n_basic * 1e3:16.1f} ms")
    print(f"{'fused (default launcher and sweeper)':52s} {fused_s:9.1f} {n_full * steps / fused_s:12,.0f} "
          f"{(fused_s - fused_train) / n_full * 1e3:16.1f} ms")
    print(f"fused / basic: {basic_scaled / fused_s:.1f}x faster end to end; fused per-job overhead "
          f"(marginal, {n_small} -> {n_full} runs, process start excluded): {per_job * 1e3:.2f} ms/run; "
          f"training inside the fused sweep: {fused_train:.1f} s")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--depth", type=int, default=10)
    ap.add_argument("--width", type=int, default=10)
    ap.add_argument("--group", type=int, default=1000, help="runs in the stacked-group rows (the benchmark sweep's size)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sweep-steps", type=int, default=200, help="steps per run in the end-to-end sweep (0: skip it)")
    ap.add_argument("--basic-runs", type=int, default=50, help="runs of the basic-launcher subset (50 or 10)")
    ap.add_argument("--out", default="outputs/bench", help="where the end-to-end sweeps are written")
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
    if args.sweep_steps:
        sweep_bench(args.sweep_steps, args.basic_runs, Path(args.out))


if __name__ == "__main__":
    main()
