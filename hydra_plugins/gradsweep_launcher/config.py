"""Config schemas of gradsweep's launcher and sweeper, registered in Hydra's ConfigStore.

No ``from __future__ import annotations`` here: Hydra's plugin scan executes this module outside
``sys.modules``, where dataclasses cannot resolve string annotations.
"""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore


@dataclass
class FusedLauncherConf:
    """Train the runs of a sweep that share an architecture as one stacked model (hydra/launcher=gradsweep)."""

    _target_: str = "hydra_plugins.gradsweep_launcher.launcher.FusedLauncher"
    max_group_runs: int | None = None  # at most this many runs in one stacked model; null: as memory_gb allows
    memory_gb: float = 1.0  # memory for one group's recorded statistics before they are written


@dataclass
class GradsweepSweeperConf:
    """Hydra's basic sweeper, without composing every job a second time when the fused launcher runs them."""

    _target_: str = "hydra_plugins.gradsweep_launcher.sweeper.GradsweepSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None


ConfigStore.instance().store(group="hydra/launcher", name="gradsweep", node=FusedLauncherConf, provider="gradsweep")
ConfigStore.instance().store(group="hydra/sweeper", name="gradsweep", node=GradsweepSweeperConf, provider="gradsweep")
