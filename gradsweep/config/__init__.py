"""A run's configuration: one dataclass per Hydra group (``sections``), the checks that give a bad key or value its
one-line error (``checks``), and a run's identity: its run_id and its config as table columns (``identity``).

Imports nothing else of gradsweep's, and reads no file: data=arrays is bound to its file by the engine
(``gradsweep.engine.arrays.bind_data``)."""

from gradsweep.lazy import exports

_WHERE = {"RunCfg": "sections", "SECTIONS": "sections", "build_run_cfg": "sections", "build_section": "sections",
          "config_hash": "identity", "flatten": "identity"}
__all__ = sorted(_WHERE)
__getattr__ = exports(__name__, _WHERE)
