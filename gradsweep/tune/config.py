"""The tuner's settings: the ``tune`` group (``gradsweep/conf/tune/default.yaml``), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

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
    """The ``tune`` group (``gradsweep/conf/tune/default.yaml`` sets only what differs from these defaults)."""

    n_trials: int = 64
    """Trials this invocation adds to the study."""
    batch_size: int = 16
    """Trials asked at once and trained as one fused group."""
    lr_min: float = 1e-4
    """optim.lr is searched log-uniformly in [lr_min, lr_max]."""
    lr_max: float = 10.0
    """The top of the lr range."""
    search: list[SearchDim] = field(default_factory=list)
    """Extra dimensions, given as a dict, e.g. {train.clip_norm: {low: 0.1, high: 100, log: true}}; null: none."""
    sampler: str = "tpe"
    """tpe, random, qmc, gp, nsgaii or cmaes."""
    seed: int = 0
    """The sampler's seed (a resumed study reseeds with seed + trials so far)."""
    objective: str = "final_loss"
    """final_loss (the loss on the data after the last step) or loss_auc (the mean logged loss)."""
    study_name: str | None = None
    """null: named after the configuration (model, init, optimiser, and a hash of the rest)."""
    storage: str | None = None
    """null: an Optuna journal file <out_dir>/tune/study.journal; or any SQLAlchemy URL; or a file path."""
    out_dir: str | None = None
    """null: outputs/tune/<study_name>."""
    stale_after_s: float = 120.0
    """A RUNNING trial without a heartbeat this long (or whose local process died) is failed and queued again."""
    safety: float = 2.0
    """The best stable lr is picked at least this factor below the first unstable lr above the band."""

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


def register() -> None:
    """Register the ``tune`` group's base (every TuneCfg key, valued as its defaults) with the run config's."""
    from gradsweep.config import store

    store.register()
    store.register_bases("tune", TuneCfg, {"default": tuple(f.name for f in fields(TuneCfg))})
