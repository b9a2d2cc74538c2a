"""What every figure of the report shares: colours, the page width, the panel grid, text helpers."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

# Okabe-Ito, safe for the common colour-vision deficiencies.
VERDICT_COLORS = {"healthy": "#009E73", "stalled": "#E69F00", "vanishing": "#0072B2", "exploding": "#D55E00",
                  "dead": "#CC79A7", "diverged": "#4D4D4D"}
RATIO_CMAP = "RdBu_r"  # ColorBrewer diverging, colour-blind safe: blue = vanishing, red = exploding
DIVERGED_FACE = "#4D4D4D"
MISSING_FACE = "#F0F0F0"
ZERO_SIGNAL = "#56B4E9"  # Okabe-Ito sky blue: outside magma, so a zero signal never reads as a small one
UNDERFLOW_COLOR = "#009E73"  # Okabe-Ito bluish green: a zero that is float underflow, not a cut
MAX_ANNOTATED_CELLS = 600  # per panel; beyond it the colours speak alone


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{v:g}"
    return str(v)


def _panels(cells: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    if (cells["facet"] == "").all():
        return [("", cells)]
    return list(cells.groupby("facet", sort=False))


MAX_WIDTH_IN = 12.2  # at the report's 110 dpi, 1,342 px: the page's width at 1400 px, so no figure is scaled down


def _grid(n: int, panel_w: float, panel_h: float, extra_w: float = 0.0) -> tuple[plt.Figure, list[plt.Axes]]:
    """Panels in as many columns (up to 3) as fit MAX_WIDTH_IN; more rows instead of smaller text."""
    panel_w = min(panel_w, MAX_WIDTH_IN - extra_w)
    ncols = max(1, min(n, 3, int((MAX_WIDTH_IN - extra_w) // panel_w)))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_w * ncols + extra_w, panel_h * nrows + 1.0),
                             squeeze=False, layout="constrained")
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def smallest_text_pt(fig: plt.Figure) -> float:
    """The smallest font size (points) of any text the figure shows (call after it has been drawn)."""
    import matplotlib.text

    def shown(t: matplotlib.text.Text) -> bool:
        return bool(t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.get_visible()))

    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if shown(t)]
    return float(min(sizes)) if sizes else 0.0


def _ink(rgba) -> str:
    r, g, b = rgba[:3]
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.55 else "white"


def _wrap_title(title: str, width: int) -> str:
    """A flow map's title, its key=value line broken at commas where it is wider than the map."""
    import textwrap

    head, _, rest = title.partition("\n")
    return "\n".join([*textwrap.wrap(head, width, break_long_words=False), *([rest] if rest else [])])


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
