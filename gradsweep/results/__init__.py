"""A sweep's results: the parquet ``schema``, the tables built from a trained group's trace (``tables``), the
``verdicts`` and the mean-field predictions they are read against (``theory``), and the directory on disk with its
loaders (``store``: ``load_sweep``, ``select``).

Imports the engine and config, never the sweep, the report or the tuner. ``store`` and ``schema`` import no torch."""

from gradsweep.lazy import exports

_WHERE = {"load_sweep": "store", "load_runs": "store", "load_steps": "store", "select": "store",
          "build_tables": "tables", "counts_text": "verdicts"}
__all__ = sorted(_WHERE)
__getattr__ = exports(__name__, _WHERE)
