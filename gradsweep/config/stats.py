"""The ``stats`` section: what a run measures besides its per-layer statistics."""

from __future__ import annotations

from dataclasses import dataclass

from gradsweep.config.checks import check, finite


@dataclass
class StatsCfg:
    """What is measured besides the per-layer statistics: the sharpness (the top eigenvalue of the training loss's
    Hessian, gradsweep.engine.curvature), from which a run's learning-rate edge is predicted. How a run is
    observed, not what it computes: not part of its run_id."""

    sharpness: bool = True
    """Measure the sharpness at step 0 (before the first update) and after the last step, on the whole training
    set."""
    sharpness_every: int = 0
    """Also every this many logged steps through training (0: not through training); needs ``sharpness``."""
    sharpness_tol: float = 1e-5
    """Lanczos stops for a run once its Ritz residual is at most this times the estimate (relative accuracy)."""
    sharpness_max_iter: int = 100
    """Hessian-vector products per run and measurement at most."""

    def __post_init__(self) -> None:
        check("stats.sharpness_every", self.sharpness_every, self.sharpness_every >= 0,
              "an integer >= 0 (0: at step 0 and the end only)")
        check("stats.sharpness_every", self.sharpness_every, self.sharpness or not self.sharpness_every,
              "0 with stats.sharpness=false")
        check("stats.sharpness_tol", self.sharpness_tol, finite(self.sharpness_tol) and 0 < self.sharpness_tol < 1,
              "a number > 0 and < 1")
        check("stats.sharpness_max_iter", self.sharpness_max_iter, self.sharpness_max_iter >= 1, "an integer >= 1")
