"""``python -m gradsweep.tune [overrides]``: search a stable learning rate with Optuna, trials trained in fused batches.

The configuration is the runner's (``gradsweep/conf/``, the same overrides: ``model.depth=30 init=kaiming``...) plus the
``tune`` group (``gradsweep/conf/tune/default.yaml``). ``tune.batch_size`` trials are asked at once and trained as one
stacked group; each is told its objective (the loss after training, or the mean logged loss) and its
stability constraints (Optuna's ``Trial.set_constraint``, named as below; on Optuna 4 the samplers that take a
``constraints_func`` get them through it):

- ``diverged``: the run did not diverge (no NaN/Inf in its loss or gradients),
- ``dead``: some signal reaches the first layer at the end of training,
- ``vanishing`` / ``exploding``: its gradient ratio lies within ``verdict.vanish_below`` .. ``verdict.explode_above``
  at initialisation and as its median over training,
- ``stalled``: its final loss is below ``(1 - verdict.stall_margin)`` times the data's baseline loss (the loss of
  predicting the mean, or the class prior),
- ``loss_increased``: its final loss is not above its initial loss.

A trial is stable (feasible) exactly when its run's verdict is ``healthy`` and its loss fell.

Infeasible trials are kept and marked (user attributes ``feasible`` and ``constraints``). The study lives in an
Optuna journal file under the output directory by default (or any SQLAlchemy URL, e.g. PostgreSQL) and a
rerun of the same command continues it. Outputs, under ``<out_dir>/tune/``: ``best.json`` (the best stable
learning rate, its loss, the stability edge), ``stability.png``, ``trials.csv``, and every trial's run tables
(``groups/``, ``trials/<number>/``), which ``load_sweep`` and the report read like any sweep.

Modules: ``cli`` (composition, the ask/tell loop, the command), ``study`` (storage, sampler, constraints),
``trials`` (trained through ``gradsweep.sweep.group``), ``recovery`` (dead workers), ``results`` (the stable band,
best.json). ``TuneCfg`` is in ``gradsweep.tune.config``.
"""

from gradsweep.lazy import exports

_WHERE = {"compose": "cli", "main": "cli", "tune_study": "cli", "best_of_study": "results", "stable_band": "results"}
__all__ = sorted(_WHERE)
__getattr__ = exports(__name__, _WHERE)
