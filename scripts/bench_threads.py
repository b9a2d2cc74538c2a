"""The README's quick-start sweep on an idle machine and next to two busy processes, with gradsweep's thread choice
(``gradsweep.engine.device.choose_threads``) and with torch's default of one thread per core (``GRADSWEEP_THREADS=<cores>``).

The busy processes are bounded busy loops this script starts itself (one per core, each stopping on its own after
its time). Rounds interleave the rows; the median of the rounds is reported.

The floor: a single-threaded program beside N busy processes on C cores gets at most C / (N + 1) of a core
under the kernel's fair scheduler (1.5x slower for N = C = 2), whatever it does. The control rows measure it: a
pure-Python loop of about the quick start's idle length, no gradsweep, no torch, idle and beside the same loops.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK_START = ["-m", "model.depth=2,10,30", "init=xavier,kaiming", "quiet=true"]
BUSY = "import time\nend = time.time() + {s}\nwhile time.time() < end:\n    pass\n"
CONTROL = "x = 0\nfor i in range({n}):\n    x += i\n"


def control(n: int) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", CONTROL.format(n=n)], check=True)
    return time.perf_counter() - t0


def sweep(out: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "gradsweep", *QUICK_START, f"hydra.sweep.dir={out}"], check=True,
                   capture_output=True, env=env, timeout=1800)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy", type=int, default=len(os.sched_getaffinity(0)), help="busy processes (default: a core each)")
    args = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "GRADSWEEP_THREADS",
                                                             "GRADSWEEP_MAX_THREADS")}
    rows = {"gradsweep's choice, idle": (base, False), f"torch default ({cores} threads), idle":
            ({**base, "GRADSWEEP_THREADS": str(cores)}, False),
            f"gradsweep's choice, {args.busy} busy processes": (base, True),
            f"torch default ({cores} threads), {args.busy} busy processes": ({**base, "GRADSWEEP_THREADS": str(cores)}, True),
            "control: a pure-Python loop, idle": (None, False),
            f"control: a pure-Python loop, {args.busy} busy processes": (None, True)}
    times: dict[str, list[float]] = {k: [] for k in rows}
    n = 0  # the control loop's length, set after the first idle quick start
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, (env, busy) in rows.items():
                if env is None and not n:
                    n = int(5_000_000 * times["gradsweep's choice, idle"][0] / control(5_000_000))
                loops = [subprocess.Popen([sys.executable, "-c", BUSY.format(s=600)]) for _ in range(args.busy if busy else 0)]
                try:
                    time.sleep(0.5 if busy else 0)
                    times[name].append(control(n) if env is None else
                                       sweep(Path(tmp) / f"{r}-{len(times[name])}-{hash(name) % 1000}", env))
                finally:
                    for p in loops:
                        p.kill()
                        p.wait()
    print(f"quick start (python -m gradsweep {' '.join(QUICK_START)}), {cores} cores, median of {args.rounds} rounds")
    print(f"{'row':52s} {'wall s':>8s} {'vs idle':>8s}")
    for name in rows:
        m = statistics.median(times[name])
        idle = statistics.median(times["control: a pure-Python loop, idle" if name.startswith("control")
                                       else "gradsweep's choice, idle"])
        print(f"{name:52s} {m:8.1f} {m / idle:7.2f}x")
    print(f"floor for a single-threaded program beside {args.busy} busy processes on {cores} cores: "
          f"{max(1.0, (args.busy + 1) / cores):.2f}x by fair scheduling; the control row measures it here")


if __name__ == "__main__":
    main()
