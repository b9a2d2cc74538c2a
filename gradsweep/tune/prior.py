"""tune.prior=curvature: where to search the learning rate, from the configuration's sharpness at initialisation.

The edge lambda_0 predicts (gradsweep.results.edge: 2 (1 + momentum) / (lambda_0 + weight_decay) for SGD) varies by
two orders of magnitude across depths, activations and inits, so a fixed range wastes most trials on learning rates
that train nothing or diverge at once. The prior measures lambda_0 once, before the first batch (every trial of a
study shares the configuration but its lr and the tune.search keys, none of which changes the parameters at
initialisation), and searches tune.config.PRIOR_RANGE times the edge, unless the user gave a range; a new
study's first trials are tune.config.PRIOR_PROBES times it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from gradsweep.config.sections import RunCfg
from gradsweep.tune.config import PRIOR_RANGE, TuneCfg


def curvature_prior(base: RunCfg, tune: TuneCfg) -> tuple[TuneCfg, dict[str, Any]]:
    """The TuneCfg the study searches with (both lr ends set: from the prior where it applies) and what the prior
    measured, for best.json: ``prior`` (curvature where it set the range, else none), ``sharpness_init`` and
    ``lr_edge_pred`` where measured, ``why`` where it did not set the range. ``base``: the study's configuration,
    bound (gradsweep.tune.cli.compose), whose lr does not change its sharpness at initialisation."""
    lo, hi = tune.lr_range()
    fixed = replace(tune, lr_min=lo, lr_max=hi)
    if tune.prior == "none":
        return fixed, {"prior": "none", "why": "tune.prior=none"}
    from gradsweep.engine.train import initial_sharpness
    from gradsweep.results.edge import lr_edge

    if base.optim.name == "adam":
        return fixed, {"prior": "none", "why": lr_edge(base.optim, math.nan)[1]}
    sharpness = float(initial_sharpness([replace(base, quiet=True)]).value[0])
    edge, note = lr_edge(base.optim, sharpness)
    if not math.isfinite(edge):
        return fixed, {"prior": "none", "why": note, "sharpness_init": sharpness if math.isfinite(sharpness) else None}
    measured = {"sharpness_init": sharpness, "lr_edge_pred": edge}
    if tune.lr_min is not None or tune.lr_max is not None:
        return fixed, {"prior": "none", "why": "tune.lr_min / tune.lr_max given", **measured}
    lo, hi = PRIOR_RANGE[0] * edge, PRIOR_RANGE[1] * edge
    return replace(tune, lr_min=lo, lr_max=hi), {"prior": "curvature", **measured, "lr_min": lo, "lr_max": hi}
