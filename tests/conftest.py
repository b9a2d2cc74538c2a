from __future__ import annotations

import functools
import os
import statistics
import time

import pytest

# The suite runs in parallel workers (pytest-xdist, -n auto): one torch thread per worker and per subprocess it starts,
# so that two workers on two cores do not each spin two threads. A value already set is kept.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GRADSWEEP_MAX_THREADS", "1")  # gradsweep's own choice (device.choose_threads) stays within it
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")  # engine=compiled: no pool of compile workers per worker

from gradsweep.config.sections import RunCfg
from gradsweep.engine.arrays import bound_run_cfg

# Modules whose tests share an expensive module-scoped fixture (a real sweep, a SLURM cluster), longest first: each
# runs on one xdist worker (--dist loadgroup), so the fixture is built once, and they are handed out first, so that
# the suite ends on short tests spread over every worker instead of one long module on one.
SHARED_FIXTURE_MODULES = ("test_resume", "test_tune", "test_slurm", "test_report_readable", "test_bad_input",
                          "test_report", "test_layout")


def pytest_xdist_auto_num_workers(config):
    """-n auto: one worker more than the cores, so that a core is not idle while a worker waits on a subprocess it
    polls, a SLURM queue or a browser."""
    return (os.cpu_count() or 1) + 1


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    def module(item) -> str:
        return item.module.__name__.rpartition(".")[2]

    for item in items:
        if module(item) in SHARED_FIXTURE_MODULES:
            item.add_marker(pytest.mark.xdist_group(module(item)))
    rank = {m: i for i, m in enumerate(SHARED_FIXTURE_MODULES)}
    items.sort(key=lambda item: rank.get(module(item), len(rank)))  # stable: each module keeps its order


def make_cfg(**sections) -> RunCfg:
    """A RunCfg from section dicts, e.g. make_cfg(model={"depth": 3}, train={"steps": 5})."""
    base = {"quiet": True, "device": "cpu"}
    return bound_run_cfg({**base, **sections})


# The probe below took ~0.1 s on the machine the timeouts were set on (2-core AMD EPYC, 2026-11-27, the test suite
# running beside it). A slower or busier machine gets proportionally longer timeouts.
PROBE_REFERENCE_S = 0.1


@functools.cache
def machine_factor() -> float:
    """How much slower this machine runs gradsweep's kind of work than the reference (>= 1): small torch ops in a
    Python loop, then plain Python; the median of three tries, measured once per session."""
    import torch

    def probe() -> float:
        t0 = time.perf_counter()
        a = torch.randn(16, 16, generator=torch.Generator().manual_seed(0))
        for _ in range(3000):
            a = torch.tanh(a @ a * 0.1)
        s = 0
        for i in range(300_000):
            s += i * i
        return time.perf_counter() - t0

    return max(1.0, statistics.median(probe() for _ in range(3)) / PROBE_REFERENCE_S)


def scaled(seconds: float) -> float:
    """A subprocess timeout of ``seconds`` on the reference machine, scaled by :func:`machine_factor`."""
    return seconds * machine_factor()


@pytest.fixture
def cfg_factory():
    return make_cfg


@pytest.fixture
def composed():
    """Compose the real conf/ with Hydra's compose API (as a test would), returning a function of overrides."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from gradsweep.sweep.preflight import CONF_DIR
    from gradsweep.tune.config import register

    def _compose(overrides: list[str] | None = None):
        register()  # the presets' bases and the tuner's, as gradsweep's entry points register them
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides or [], return_hydra_config=False)

    yield _compose
    GlobalHydra.instance().clear()
