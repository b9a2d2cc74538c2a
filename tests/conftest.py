from __future__ import annotations

import pytest

from gradsweep.config import RunCfg, build_run_cfg


def make_cfg(**sections) -> RunCfg:
    """A RunCfg from section dicts, e.g. make_cfg(model={"depth": 3}, train={"steps": 5})."""
    base = {"quiet": True, "device": "cpu"}
    return build_run_cfg({**base, **sections})


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
