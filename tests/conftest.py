from __future__ import annotations

import functools
import statistics
import time

import pytest

from gradsweep.config import RunCfg, build_run_cfg


def make_cfg(**sections) -> RunCfg:
    """A RunCfg from section dicts, e.g. make_cfg(model={"depth": 3}, train={"steps": 5})."""
    base = {"quiet": True, "device": "cpu"}
    return build_run_cfg({**base, **sections})


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

    from gradsweep.preflight import CONF_DIR

    def _compose(overrides: list[str] | None = None):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="config", overrides=overrides or [], return_hydra_config=False)

    yield _compose
    GlobalHydra.instance().clear()
