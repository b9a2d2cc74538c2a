"""Training: R runs of one architecture as one stacked model, and what is recorded of them.

- ``train``: the loop (``train_group``); ``trace``: what it records (``GroupTrace``); ``curvature``: the sharpness;
- the nets: ``mlp`` (the built-in MLP, parameters stacked along a run axis), ``nets`` (nets built as ``nn.Module``:
  cnn, resmlp, your own) and ``module_runs`` (those trained as a stack of runs); ``init``, ``optim``, ``losses``;
- ``stats`` (per-layer gradient statistics on the device) and ``records`` (their names, without torch);
- ``data`` and ``arrays`` (your own file), ``device`` (where a group trains and what it takes);
- ``compiled`` and ``programs`` (``engine=compiled``), ``kernels/`` (gradsweep's CPU kernels).

Imports only ``gradsweep.config`` and the package's base modules."""

from gradsweep.lazy import exports

_WHERE = {"train_group": "train", "GroupTrace": "trace", "load_data": "data", "bind_data": "arrays",
          "bound_run_cfg": "arrays", "LAYER_STATS": "records"}
__all__ = sorted(_WHERE)
__getattr__ = exports(__name__, _WHERE)
