"""The report's figures: where-it-breaks heatmaps, gradient-flow maps, loss curves.

Every function takes already aggregated frames (no per-run Python loops over rows) and returns a
matplotlib Figure; the caller saves it.

Modules: ``style`` (colours, page width, grid), ``heatmaps``, ``flow`` (gradient-flow maps), ``curves`` (loss curves,
the tuner's stability plot, the article's figures, the theory scatter).
"""

from gradsweep.report.figures.curves import ARTICLE_CLAIMS, article_figure, loss_curves, prediction_scatter, stability_plot
from gradsweep.report.figures.flow import flow_maps
from gradsweep.report.figures.heatmaps import heatmap, ratio_scale
from gradsweep.report.figures.style import MAX_WIDTH_IN, VERDICT_COLORS, plt, smallest_text_pt

__all__ = ["ARTICLE_CLAIMS", "MAX_WIDTH_IN", "VERDICT_COLORS", "article_figure", "flow_maps", "heatmap", "loss_curves",
           "plt", "prediction_scatter", "ratio_scale", "smallest_text_pt", "stability_plot"]
