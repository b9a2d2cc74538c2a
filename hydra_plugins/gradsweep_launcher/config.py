"""Config schemas of gradsweep's launcher and sweeper, registered in Hydra's ConfigStore.

No ``from __future__ import annotations`` here: Hydra's plugin scan executes this module outside
``sys.modules``, where dataclasses cannot resolve string annotations.
"""

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf


@dataclass
class FusedLauncherConf:
    """Train the runs of a sweep that share an architecture as one stacked model (hydra/launcher=gradsweep)."""

    _target_: str = "hydra_plugins.gradsweep_launcher.launcher.FusedLauncher"
    max_group_runs: int | None = None  # at most this many runs in one stacked model; null: as memory_gb allows
    memory_gb: float = 1.0  # memory for one group's recorded statistics before they are written


@dataclass
class FusedSubmititLocalConf(FusedLauncherConf):
    """Fused groups, each group one submitit job on this machine (hydra/launcher=gradsweep_submitit_local)."""

    executor: str = "local"
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"
    timeout_min: int = 60
    cpus_per_task: int | None = None
    gpus_per_node: int | None = None
    mem_gb: int | None = None
    nodes: int | None = None
    tasks_per_node: int | None = None


@dataclass
class FusedSubmititSlurmConf(FusedSubmititLocalConf):
    """Fused groups, each group one SLURM job (hydra/launcher=gradsweep_submitit_slurm): a cluster sweep keeps
    the batching; parameters named as in hydra-submitit-launcher's submitit_slurm."""

    executor: str = "slurm"
    partition: str | None = None
    qos: str | None = None
    account: str | None = None
    constraint: str | None = None
    additional_parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class GradsweepSweeperConf:
    """Hydra's basic sweeper, without composing every job a second time when the fused launcher runs them."""

    _target_: str = "hydra_plugins.gradsweep_launcher.sweeper.GradsweepSweeper"
    max_batch_size: int | None = None
    params: dict[str, str] | None = None


ConfigStore.instance().store(group="hydra/launcher", name="gradsweep", node=FusedLauncherConf, provider="gradsweep")
ConfigStore.instance().store(group="hydra/launcher", name="gradsweep_submitit_local", node=FusedSubmititLocalConf,
                             provider="gradsweep")
ConfigStore.instance().store(group="hydra/launcher", name="gradsweep_submitit_slurm", node=FusedSubmititSlurmConf,
                             provider="gradsweep")
ConfigStore.instance().store(group="hydra/sweeper", name="gradsweep", node=GradsweepSweeperConf, provider="gradsweep")


def _open_net() -> Any:
    """model=custom's ``net`` node: open, so that ``model.net.<arg>=...`` adds any argument of the user's module
    without Hydra's ``+`` (model/custom.yaml puts it at model.net)."""
    node = OmegaConf.create({"_target_": "???"})
    OmegaConf.set_struct(node, False)
    return node


ConfigStore.instance().store(group="gradsweep/net", name="open", node=_open_net(), provider="gradsweep")
