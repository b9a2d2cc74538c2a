"""``python -m gradsweep.report [sweep dir]``: a sweep's heatmaps, gradient-flow maps, loss curves and run table as
one HTML page. ``build`` makes it (``make_report``), ``sweepdirs`` finds the sweeps it reads, ``layout`` decides the
axes and cells, ``figures/`` draws, ``html`` writes the page and ``text`` its words.

Imports results and config, never the sweep, the engine or the tuner."""

from gradsweep.lazy import exports

_WHERE = {"make_report": "build", "main": "build"}
__all__ = sorted(_WHERE)
__getattr__ = exports(__name__, _WHERE)
