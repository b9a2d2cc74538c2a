"""torch's threads per group (device.choose_threads): the cores this process may use, less those others keep busy."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from gradsweep.engine.device import MAX_THREADS_ENV, THREADS_ENV, busy_cores, choose_threads

CORES = len(os.sched_getaffinity(0))


def test_an_exact_count_and_a_cap_are_obeyed(monkeypatch):
    monkeypatch.delenv(MAX_THREADS_ENV, raising=False)
    monkeypatch.setenv(THREADS_ENV, "3")
    assert choose_threads() == 3
    monkeypatch.delenv(THREADS_ENV)
    monkeypatch.setenv(MAX_THREADS_ENV, "1")
    assert choose_threads() == 1
    monkeypatch.delenv(MAX_THREADS_ENV)
    assert 1 <= choose_threads() <= CORES


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="busy cores are read from Linux's /proc/stat")
def test_a_busy_process_is_seen():
    loop = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.5)
        seen = max(busy_cores(0.2) for _ in range(3))
    finally:
        loop.kill()
        loop.wait()
    assert seen >= 0.5  # one process spinning on a core (others may add to it, never take from it)
