"""The tuner's settings: the ``tune`` group (``gradsweep/conf/tune/default.yaml``), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from gradsweep.config.checks import check, choice, finite

SAMPLERS = ("tpe", "random", "qmc", "gp", "nsgaii", "cmaes")  # gradsweep.tune's Optuna samplers
OBJECTIVES = ("final_loss", "loss_auc")


@dataclass
class SearchDim:
    """One extra search dimension: a float config key searched in [low, high]."""

    key: str
    low: float
    high: float
    log: bool = False


@dataclass
class TuneCfg:
    """The ``tune`` group; see ``gradsweep/conf/tune/default.yaml``."""

    n_trials: int = 64
    batch_size: int = 16
    lr_min: float = 1e-4
    lr_max: float = 10.0
    search: list[SearchDim] = field(default_factory=list)
    sampler: str = "tpe"
    seed: int = 0
    objective: str = "final_loss"
    study_name: str | None = None
    storage: str | None = None
    out_dir: str | None = None
    stale_after_s: float = 120.0
    safety: float = 2.0

    def __post_init__(self) -> None:
        check("tune.n_trials", self.n_trials, self.n_trials >= 1, "an integer >= 1")
        check("tune.batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1")
        check("tune.lr_min", self.lr_min, 0 < self.lr_min and finite(self.lr_min), "a number > 0")
        check("tune.lr_max", self.lr_max, self.lr_min < self.lr_max and finite(self.lr_max),
               f"a number > tune.lr_min ({self.lr_min:g})")
        choice("tune.sampler", self.sampler, SAMPLERS)
        choice("tune.objective", self.objective, OBJECTIVES)
        check("tune.stale_after_s", self.stale_after_s, self.stale_after_s > 0 and finite(self.stale_after_s),
               "a number of seconds > 0")
        check("tune.safety", self.safety, self.safety >= 1 and finite(self.safety), "a number >= 1")
        if self.study_name is not None:
            check("tune.study_name", self.study_name, bool(self.study_name.strip()), "a non-empty string or null")
