"""model=custom against the built-in MLP: the same net, the same sweep, side by side in one process.

Rows (article shape by default: depth 10, width 10, ReLU, 100 points, full-batch SGD, per-run lr, every statistic
every step; R runs, S steps), each one train_group call plus its tables, timed in interleaved rounds (median):

- built-in: model=mlp;
- custom Sequential: model=custom, net a function returning the same net as an ``nn.Sequential`` of Linear and ReLU
  (recognised as the built-in MLP: the built-in engines, the module's own draws);
- custom module: the same layers as an ``nn.Module`` class with its own forward (torch.func.vmap over
  functional_call, statistics through hooks): what any other module costs;
- custom module, run by run: the same, when vmap cannot take a module (timed on a subset and scaled).

    python scripts/bench_modules.py [--runs 1000] [--steps 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from gradsweep.bench import run_lr
from gradsweep.config.sections import build_run_cfg
from gradsweep.engine.train import train_group
from gradsweep.results.tables import build_tables

NETS = textwrap.dedent('''
    import torch
    from torch import nn


    def sequential(in_dim, out_dim, depth=10, width=10):
        dims = [in_dim] + [width] * depth
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        return nn.Sequential(*layers, nn.Linear(width, out_dim))


    class Module(nn.Module):
        def __init__(self, in_dim, out_dim, depth=10, width=10):
            super().__init__()
            dims = [in_dim] + [width] * depth + [out_dim]
            self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:])])

        def forward(self, x):
            for layer in self.layers[:-1]:
                x = torch.relu(layer(x))
            return self.layers[-1](x)
''')


def cfgs(runs: int, steps: int, depth: int, width: int, model: dict) -> list:
    return [build_run_cfg({"model": model, "optim": {"lr": run_lr(r)}, "quiet": True,
                           "train": {"steps": steps, "seed": r}}) for r in range(runs)]


def timed(group: list) -> tuple[float, object]:
    t0 = time.perf_counter()
    trace = train_group(group, progress=False)
    build_tables(group, trace, arrow=True)
    return time.perf_counter() - t0, trace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--depth", type=int, default=10)
    p.add_argument("--width", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loop-runs", type=int, default=20, help="runs timed for the run-by-run row (then scaled)")
    args = p.parse_args()
    home = Path(tempfile.mkdtemp(prefix="gradsweep-bench-modules-"))
    (home / "bench_nets.py").write_text(NETS)
    sys.path.insert(0, str(home))
    shape = {"depth": args.depth, "width": args.width}
    rows = {
        "built-in (model=mlp)": cfgs(args.runs, args.steps, **shape, model=shape),
        "custom nn.Sequential": cfgs(args.runs, args.steps, **shape, model={
            "name": "custom", "net": {"_target_": "bench_nets.sequential", **shape}}),
        "custom nn.Module (vmap)": cfgs(args.runs, args.steps, **shape, model={
            "name": "custom", "net": {"_target_": "bench_nets.Module", **shape}}),
    }
    times: dict[str, list[float]] = {name: [] for name in rows}
    engines = {}
    for r in range(args.rounds):
        for name, group in rows.items():
            t, trace = timed(group)
            times[name].append(t)
            engines[name] = trace.engine
            print(f"round {r + 1}: {name}: {t:.2f} s", flush=True)
    # run by run: vmap refused (what a module with dropout or data-dependent control flow gets)
    from gradsweep.engine import module_runs as modules

    vmapped = modules.ModuleStep.__init__

    def refuse(self, *a, **k):
        vmapped(self, *a, **k)
        self.vmapped = False

    modules.ModuleStep.__init__ = refuse
    try:
        loop_t, _ = timed(rows["custom nn.Module (vmap)"][:args.loop_runs])
    finally:
        modules.ModuleStep.__init__ = vmapped
    base = statistics.median(times["built-in (model=mlp)"])
    print(f"\n{args.runs} runs x {args.steps} steps, depth {args.depth}, width {args.width}, ReLU, full batch, "
          "every statistic every step (train_group + tables, median of rounds)")
    print(f"{'path':32s} {'seconds':>9s} {'vs built-in':>12s}  engine")
    for name in rows:
        t = statistics.median(times[name])
        print(f"{name:32s} {t:9.2f} {t / base:11.2f}x  {engines[name]}")
    scaled = loop_t * args.runs / args.loop_runs
    print(f"{'custom nn.Module, run by run':32s} {scaled:9.2f} {scaled / base:11.2f}x  eager ({args.loop_runs} runs timed, "
          "scaled)")


if __name__ == "__main__":
    main()
