"""The device a group trains on: its choice, its free memory, and what one run of a group takes of it.

Also the CPU's one numeric caveat: whether its BLAS gives a run the same bits wherever it sits in a group.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch

from gradsweep.config.sections import linear_dims
from gradsweep.engine.data import data_shape
from gradsweep.engine.nets import describe, layer_count
from gradsweep.engine.records import LAYER_STATS
from gradsweep.errors import ConfigError

log = logging.getLogger(__name__)

HOST_COPY_EVERY = 64  # logged steps kept on the device before one copy to the host
DEVICE_MEMORY_SHARE = 0.8  # of the free device memory, what one group may take


@functools.cache
def resolve_device(requested: str) -> torch.device:
    """``auto``: CUDA when available, else CPU (logged once per process); ``cuda`` without a GPU is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is not valid here: no CUDA GPU is available; valid values: auto, cpu")
    if requested == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("device=auto: training on %s", torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU")
        return device
    return torch.device(requested)


@functools.cache
def position_independent_blas() -> bool:
    """Whether this process's CPU matrix products give a run the same bits wherever it sits in its group.

    True where MKL's strict reproducibility mode took effect (gradsweep/__init__.py sets MKL_CBWR before
    torch's first matrix product) or the BLAS does not depend on alignment; False where torch multiplied
    matrices before gradsweep was imported. Checked by one product of a matrix at a 32-byte offset and of its
    aligned copy.
    """
    g = torch.Generator().manual_seed(0)
    a, x = torch.randn(2, 100, 10, generator=g), torch.randn(100, 1, generator=g)
    both = torch.bmm(x.expand(2, 100, 1).transpose(1, 2), a)
    alone = torch.bmm(x.expand(1, 100, 1).transpose(1, 2), a[1:2].clone())
    exact = torch.equal(both[1], alone[0])
    if not exact:
        log.warning("float32 runs on this CPU may differ in the last bits with their position in a group: torch "
                    "multiplied matrices before gradsweep was imported, so MKL_CBWR=AUTO,STRICT came too late; "
                    "import gradsweep first, or set MKL_CBWR=AUTO,STRICT in the environment")
    return exact


def device_bytes_per_run(cfg: Any) -> int:
    """An upper estimate of the device memory one run of a group takes while it trains.

    Parameters and everything of their size (gradient, clipped gradient, update, optimiser state, the
    statistics' terms: 14 copies), the forward pass kept for backward and its gradients (6 tensors of
    batch x width per block), and the statistics of the steps held on the device between host copies.
    """
    n, in_dim, out_dim = data_shape(cfg.data)
    batch = min(cfg.train.batch_size or n, n)
    if cfg.model.name != "mlp":  # a module (gradsweep.engine.nets): its parameters and its recorded layers' outputs, twice
        info = describe(cfg.model, in_dim, out_dim)
        values = 14 * info.n_params + 12 * batch * sum(math.prod(s) for s in info.out_shapes if s is not None)
    else:
        dims = linear_dims(cfg.model, in_dim, out_dim)
        n_params = sum(i * o + o for i, o in dims) + 3 * cfg.model.depth * cfg.model.width
        values = 14 * n_params + 6 * batch * sum(o for _, o in dims) * (2 if cfg.model.norm != "none" else 1)
    values += HOST_COPY_EVERY * (layer_count(cfg.model, in_dim, out_dim) * len(LAYER_STATS) + 3)
    return values * (8 if cfg.train.dtype == "float64" else 4)


def free_device_bytes(device: str) -> int | None:
    """Free memory of the CUDA device a run config resolves to; None on the CPU."""
    dev = resolve_device(device)
    return torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None


# Threads. torch starts one thread per core; on a machine whose cores other processes keep busy, its threads wait
# for each other at every one of a step's ~100 small ops, which can make a step far slower than on one thread
# (scripts/bench_threads.py measures it).
MAX_THREADS_ENV = "GRADSWEEP_MAX_THREADS"  # a cap: a submitted job's CPUs (gradsweep.sweep.submit), or the user's
THREADS_ENV = "GRADSWEEP_THREADS"  # an exact count, overriding the choice (e.g. to compare with torch's default)
BUSY_SAMPLE_S = 0.05  # how long the other processes' CPU use is watched before a group starts
BUSY_REUSE_S = 2.0  # a sample this recent serves the next group too (short groups in a row: one sample, not one each)
_last_busy: tuple[float, float] | None = None  # (time.monotonic() when taken, busy cores)


def busy_cores(sample_s: float = BUSY_SAMPLE_S) -> float:
    """Cores other processes kept busy over the last ``sample_s`` seconds (Linux /proc/stat; 0 elsewhere): the
    machine's busy time in that window minus this process's own CPU time."""
    import os
    import time

    def busy_s() -> float | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    b0, own0, t0 = busy_s(), time.process_time(), time.perf_counter()
    if b0 is None:
        return 0.0
    time.sleep(sample_s)
    b1, own1, t1 = busy_s(), time.process_time(), time.perf_counter()
    return max(0.0, ((b1 or b0) - b0 - (own1 - own0)) / (t1 - t0))


def choose_threads() -> int:
    """torch's threads for the next group: the cores this process may use (its CPU affinity, capped by
    ``GRADSWEEP_MAX_THREADS``) less those other processes keep busy right now, and at least 1.

    On an idle machine a group takes every core (more threads train faster there, at any run count); next to busy
    processes it takes only what is free, so its threads never wait for a core.
    """
    import os

    exact = os.environ.get(THREADS_ENV, "")
    if exact.isdigit() and int(exact) > 0:
        return int(exact)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cap = os.environ.get(MAX_THREADS_ENV, "")
    if cap.isdigit() and int(cap) > 0:
        cores = min(cores, int(cap))
    if cores == 1:
        return 1
    return max(1, min(cores, int(cores - _recent_busy_cores() + 0.5)))


def _recent_busy_cores() -> float:
    """:func:`busy_cores`, sampled at most once per ``BUSY_REUSE_S`` in this process."""
    import time

    global _last_busy
    now = time.monotonic()
    if _last_busy is None or now - _last_busy[0] > BUSY_REUSE_S:
        _last_busy = (now, busy_cores())
    return _last_busy[1]


def set_threads() -> int:
    """Set torch's threads by :func:`choose_threads` (CPU groups; a GPU group's host work is one thread's)."""
    n = choose_threads()
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return n
