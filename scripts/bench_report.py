"""Time the report on a large sweep: 10,000 runs x 200 steps x 10 Linear layers (depth 9), by default.

The sweep is real: every run trained (stacked per activation, as the fused path will) and written one
directory per job, as a basic-launcher multirun writes it. It is built once under --dir and reused.

    python scripts/bench_report.py [--runs 10000] [--dir outputs/bench-report-sweep]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import resource
import shutil
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from gradsweep.config.sections import build_run_cfg
from gradsweep.engine.train import train_group
from gradsweep.report.build import make_report
from gradsweep.results.schema import RUNS_INDEX
from gradsweep.results.store import write_tables
from gradsweep.results.tables import build_tables
from gradsweep.sweep.group import GroupLimits, plan
from gradsweep.sweep.preflight import CONF_DIR

LRS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
CLIPS = [None, 0.1, 1.0, 10.0, 100.0]
INITS = ["default", "xavier", "kaiming", "large"]
ACTIVATIONS = ["relu", "tanh", "sigmoid", "gelu", "leaky_relu"]


def build_sweep(root: Path, n_runs: int, steps: int) -> None:
    from omegaconf import OmegaConf

    presets = {name: OmegaConf.to_container(OmegaConf.load(CONF_DIR / "init" / f"{name}.yaml")) for name in INITS}
    seeds = range(max(1, n_runs // (len(LRS) * len(CLIPS) * len(INITS) * len(ACTIVATIONS))))
    points = list(itertools.product(ACTIVATIONS, INITS, LRS, CLIPS, seeds))[:n_runs]
    cfgs = [build_run_cfg({"model": {"depth": 9, "activation": act}, "init": presets[init], "optim": {"lr": lr},
                           "train": {"steps": steps, "clip_norm": clip, "seed": seed}, "quiet": True, "device": "cpu"})
            for act, init, lr, clip, seed in points]
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bar = tqdm(total=len(cfgs), desc="building the sweep", unit="run")
    for chunk in plan(cfgs, list(range(len(cfgs))), GroupLimits(max_runs=1000)):
        meta = [{"job_num": i, "override_dirname": f"model.activation={points[i][0]},init={points[i][1]},"
                 f"optim.lr={points[i][2]},train.clip_norm={points[i][3]},train.seed={points[i][4]}"} for i in chunk]
        runs, steps_t = build_tables([cfgs[i] for i in chunk], train_group([cfgs[i] for i in chunk]), meta)
        bounds = np.searchsorted(steps_t.run_id.to_numpy(), runs.run_id.to_numpy(), side="left") \
            if steps_t.run_id.is_monotonic_increasing else None
        for row, i in enumerate(chunk):
            if bounds is not None:
                lo = bounds[row]
                hi = bounds[row + 1] if row + 1 < len(bounds) else len(steps_t)
                part = steps_t.iloc[lo:hi]
            else:
                part = steps_t[steps_t.run_id == runs.run_id[row]]
            write_tables(tmp / str(i), runs.iloc[[row]], part)
            bar.update(1)
    bar.close()
    tmp.rename(root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--dir", default="outputs/bench-report-sweep")
    args = ap.parse_args()
    root = Path(args.dir)
    if not (root / "0" / "runs.parquet").exists():
        build_sweep(root, args.runs, args.steps)
    out = root.with_name(root.name + "-report")
    n = sum(1 for _ in root.glob("*/runs.parquet"))
    print(f"{n:,} runs x {args.steps} steps x 10 Linear layers, {platform.machine()}, {os.cpu_count()} cores, "
          f"{time.strftime('%Y-%m-%d')}")
    # Cold: no runs index, every run's file read (a sweep copied from elsewhere, or made by another tool).
    # Warm: the index a gradsweep multirun writes when it ends (and the cold report leaves behind).
    (root / RUNS_INDEX).unlink(missing_ok=True)
    for name in ("cold (no runs index)", "warm (runs index present)"):
        t0 = time.perf_counter()
        index = make_report(root, out=out, quiet=True)
        print(f"  report, {name:26s} {time.perf_counter() - t0:6.1f} s wall")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  peak RSS of this process {peak:,.0f} MiB; {index}")


if __name__ == "__main__":
    main()
