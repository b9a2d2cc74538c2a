"""Hold a real sweep at a point of its own, not at a moment in time.

Tests that kill a sweep, a tuner or a submitted job while it trains wait for a hold, then kill: a busy machine
that redraws a progress bar seldom, or a fast one that trains a group before it is seen, cannot move the point.

- :func:`held` runs ``python -m <module>`` with one change: the n-th group that process trains stops at one of
  its steps, writes a marker file and sleeps until it is killed (or interrupted).
- :func:`gated` writes a user's module (``model=custom``) whose forward pass waits while a gate file exists: it
  reaches the processes a launcher starts itself (submitit's local jobs, SLURM's), which :func:`held` cannot.
- :func:`wait` and :class:`Reading`: waiting, with a bound, for a hold, a file or a line a child writes.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from conftest import scaled

HOLD = """\
import os, runpy, sys, time
from pathlib import Path

sys.path[0] = os.getcwd()  # as `python -m` has it: the checkout the test runs in, not this script's folder
import gradsweep.engine.train as train

group, step, marker = int(os.environ["HOLD_GROUP"]), int(os.environ["HOLD_STEP"]), Path(os.environ["HOLD_MARKER"])
made, started = train.progress_bar, 0


def hold():
    marker.write_text("held")
    while True:  # short sleeps: a SIGINT that lands before one starts is seen within 0.05 s
        time.sleep(0.05)


def progress_bar(**kwargs):  # train.py makes one bar per group it trains, and updates it once a step
    global started
    bar = made(**kwargs)
    started += 1
    if started == group:
        if step == 0:
            hold()
        update, n = bar.update, [0]

        def counted(k=1):
            n[0] += k
            if n[0] >= step:
                hold()
            return update(k)

        bar.update = counted
    return bar


train.progress_bar = progress_bar
module = sys.argv.pop(1)
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def held(tmp_path: Path, module: str, args: list[str], group: int, step: int) -> tuple[list[str], dict, Path]:
    """``python -m module *args`` whose ``group``-th trained group (1-based, counted in this process) holds after
    ``step`` steps (0: before its first): (command, environment, the marker file it writes when it holds)."""
    script = tmp_path / "hold.py"
    script.write_text(HOLD)
    marker = tmp_path / f"held-{group}-{step}"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "HOLD_GROUP": str(group), "HOLD_STEP": str(step), "HOLD_MARKER": str(marker)}
    return [sys.executable, str(script), module, *args], env, marker


GATED = """\
import os
import time
from pathlib import Path

from torch import nn

calls = 0


class GatedMLP(nn.Module):
    def __init__(self, in_dim, out_dim, depth=2, width=16):
        super().__init__()
        sizes = [in_dim] + [width] * (depth - 1)
        layers = [m for a, b in zip(sizes, sizes[1:]) for m in (nn.Linear(a, b), nn.Tanh())]
        self.body = nn.Sequential(*layers, nn.Linear(sizes[-1], out_dim))

    def forward(self, x):
        global calls
        calls += 1
        gate = Path(os.environ["GATE"])
        if calls > 50 and gate.exists():
            (gate.parent / f"gated-{os.getpid()}").touch()
            until = time.monotonic() + 600  # a test that died without removing its gate holds no job for ever
            while gate.exists() and time.monotonic() < until:
                time.sleep(0.05)
        return self.body(x)
"""

# The sweep keys of a gated module, swept over its depth: one architecture, so one group, per depth.
GATED_MODEL = ["model=custom", "model.net._target_=gated_nets.GatedMLP"]


def gated(tmp_path: Path, env: dict | None = None) -> tuple[dict, Path]:
    """Write ``gated_nets.GatedMLP`` into ``tmp_path``: (an environment that imports it, its gate file). Its
    forward pass, after its first 50 calls in a process (pre-flight's few, then training), waits while the gate
    exists, and leaves ``gated-<pid>`` beside it: every process held there has one."""
    (tmp_path / "gated_nets.py").write_text(GATED)
    env = dict(os.environ if env is None else env)
    env["GATE"] = str(tmp_path / "gate")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tmp_path), env.get("PYTHONPATH")) if p)
    return env, tmp_path / "gate"


def gated_pids(tmp_path: Path) -> list[int]:
    """The processes held at the gate in ``tmp_path`` (or once held there)."""
    return sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("gated-*"))


def wait(until: Callable[[], object], proc: subprocess.Popen, seconds: float = 120) -> None:
    """Until ``until()`` is true, ``proc`` has ended, or ``seconds`` (scaled to the machine) have passed."""
    deadline = time.monotonic() + scaled(seconds)
    while time.monotonic() < deadline and proc.poll() is None and not until():
        time.sleep(0.01)


class Reading:
    """A child started with its stdout and stderr in one pipe, read by a thread as they come: a test can wait for a
    line (:meth:`saw`) while the child runs."""

    def __init__(self, cmd: list[str], **popen) -> None:
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self._thread.start()

    def saw(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def finish(self, seconds: float) -> tuple[int, str]:
        """(exit status, everything it wrote), once it has ended within ``seconds`` (scaled)."""
        status = self.proc.wait(timeout=scaled(seconds))
        self._thread.join(timeout=10)
        return status, "".join(self.lines)
