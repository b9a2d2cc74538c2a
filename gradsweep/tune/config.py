"""The tuner's settings: the ``tune`` group (``gradsweep/conf/tune/default.yaml``), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from gradsweep.config.checks import check, choice, finite

SAMPLERS = ("tpe", "random", "qmc", "gp", "nsgaii", "cmaes")  # gradsweep.tune's Optuna samplers
OBJECTIVES = ("final_loss", "loss_auc")
PRIORS = ("curvature", "none")
PRIOR_PROBES = (1.0, 2.0, 4.0, 2 ** -0.5, 2 ** 0.5, 2 ** 1.5)
"""A new study's first trials under the prior (as many as it asks for, coarse to fine): these multiples of the
predicted edge, where the catapult phase begins (1x) and, on the article's nets, the tuner's edge lies (1.3-4x:
BENCHMARKS.md), so the sampler starts from a bracket of the edge instead of from chance."""
LR_RANGE = (1e-4, 10.0)
"""The lr range without a prior (tune.prior=none, adam, or no sharpness)."""
PRIOR_RANGE = (0.1, 20.0)
"""tune.prior=curvature searches lr in these multiples of the edge lambda_0 predicts (gradsweep.results.edge):
a decade below it, where training is slow but stable, to past the catapult phase, where nets diverge."""


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
    lr_min: float | None = None
    """optim.lr is searched log-uniformly in [lr_min, lr_max]; null: from the curvature prior (tune.prior), else
    1e-4. Given (either end), the range is the user's and the prior only reports its prediction."""
    lr_max: float | None = None
    """The top of the lr range; null: from the curvature prior, else 10."""
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
    prior: str = "curvature"
    """curvature: measure the sharpness lambda_0 of the configuration before the first batch and search lr in
    0.1x .. 20x the edge it predicts, 2 (1 + momentum) / lambda_0, unless tune.lr_min or tune.lr_max is given; none,
    or an optimiser without a prediction (adam): tune.lr_min .. tune.lr_max (default 1e-4 .. 10)."""
    safety: float = 2.0
    """The best stable lr is picked at least this factor below the first unstable lr above the band."""

    def lr_range(self) -> tuple[float, float]:
        """The lr range searched: lr_min .. lr_max, each end's default (LR_RANGE) where null."""
        return (LR_RANGE[0] if self.lr_min is None else self.lr_min, LR_RANGE[1] if self.lr_max is None else self.lr_max)

    def __post_init__(self) -> None:
        check("tune.n_trials", self.n_trials, self.n_trials >= 1, "an integer >= 1")
        check("tune.batch_size", self.batch_size, self.batch_size >= 1, "an integer >= 1")
        lo, hi = self.lr_range()
        if self.lr_min is not None:
            check("tune.lr_min", self.lr_min, 0 < lo and finite(lo), "a number > 0")
        check("tune.lr_max" if self.lr_max is not None else "tune.lr_min", self.lr_max if self.lr_max is not None
              else self.lr_min, lo < hi and finite(hi), f"a number > tune.lr_min ({lo:g})" if self.lr_max is not None
              else f"a number < tune.lr_max ({hi:g})")
        choice("tune.sampler", self.sampler, SAMPLERS)
        choice("tune.objective", self.objective, OBJECTIVES)
        choice("tune.prior", self.prior, PRIORS)
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
