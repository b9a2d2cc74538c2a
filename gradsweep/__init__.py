"""gradsweep: sweep small networks and map where their gradients vanish or explode."""

import os
from typing import Any

# MKL, PyTorch's BLAS on x86-64, picks its matrix kernels by the operands' memory alignment, so in float32 a
# run's numbers would depend on its position in a fused group (seen on an AVX2 AMD EPYC: 32-byte apart
# operands differ in the last bit). Its strict reproducibility mode makes the result depend on the values
# alone. MKL reads this once, at torch's first matrix product: importing gradsweep before that turns it on
# (train.position_independent_blas checks that it took effect). A value the user set is kept.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"
__all__ = ["load_sweep", "select", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that Hydra's plugin and callback discovery does not import torch and pandas.
    if name in ("load_sweep", "select"):
        from gradsweep.results import store

        return getattr(store, name)
    raise AttributeError(f"module 'gradsweep' has no attribute {name!r}")
