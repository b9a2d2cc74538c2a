"""Batched evaluation of gradsweep.tune: 64 trials in batches of 16 against batches of 1, side by side.

    python scripts/bench_tune.py [--trials 64] [--batch 16]

Both searches run end to end from the command line (the article's data, depth 10, Kaiming, 500 steps), each
in a fresh study; the table also shows what training one fused group of ``--batch`` runs takes alone, so
that "about trials/batch groups' time" can be read off.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gradsweep.config.sections import build_run_cfg
from gradsweep.engine.train import train_group

ARGS = ["model.depth=10", "init=kaiming", "quiet=true"]


def _search(out: Path, trials: int, batch: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gradsweep.tune", *ARGS, f"tune.n_trials={trials}",
                    f"tune.batch_size={batch}", f"tune.out_dir={out}"], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    inner = json.loads((out / "tune" / "best.json").read_text())["this_invocation"]["wall_s"]
    return wall, inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=64)
    ap.add_argument("--batch", type=int, default=16)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-tune-"))
    try:
        cfgs = [build_run_cfg({"model": {"depth": 10}, "init": {"name": "kaiming", "scheme": "kaiming"},
                               "optim": {"lr": 10 ** (-4 + 3 * r / a.batch)}, "train": {"seed": 0}, "quiet": True})
                for r in range(a.batch)]
        train_group(cfgs)  # warm-up
        t0 = time.perf_counter()
        train_group(cfgs)
        group_s = time.perf_counter() - t0
        batched = _search(tmp / "batched", a.trials, a.batch)
        single = _search(tmp / "single", a.trials, 1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    groups = -(-a.trials // a.batch)
    print(f"gradsweep.tune: {a.trials} trials, depth 10, Kaiming, 500 steps, article data; "
          f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{'search':34s} {'wall s':>8s} {'trials s':>9s}")
    print(f"{f'tune.batch_size={a.batch}':34s} {batched[0]:8.1f} {batched[1]:9.1f}")
    print(f"{'tune.batch_size=1':34s} {single[0]:8.1f} {single[1]:9.1f}")
    print(f"one fused group of {a.batch} runs, trained alone: {group_s:.2f} s; {groups} such groups: {groups * group_s:.1f} s")
    print(f"batch {a.batch} vs batch 1: {single[1] / batched[1]:.1f}x faster (trials only), "
          f"{single[0] / batched[0]:.1f}x end to end; trials time / {groups} groups' time: "
          f"{batched[1] / (groups * group_s):.2f}")


if __name__ == "__main__":
    main()
