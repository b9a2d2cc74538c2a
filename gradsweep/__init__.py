"""gradsweep: sweep small networks and map where their gradients vanish or explode."""

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_sweep", "__version__"]


def __getattr__(name: str) -> Any:
    # Lazy, so that Hydra's plugin and callback discovery does not import torch and pandas.
    if name == "load_sweep":
        from gradsweep.tables import load_sweep

        return load_sweep
    raise AttributeError(f"module 'gradsweep' has no attribute {name!r}")
