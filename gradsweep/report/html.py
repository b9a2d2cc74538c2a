"""The report's ``index.html``: one self-contained page (images embedded, no network, a sortable run table)."""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path

import numpy as np
import pandas as pd

from gradsweep.report.figures import VERDICT_COLORS
from gradsweep.report.layout import SEVERITY, Layout

MAX_TABLE_ROWS = 2000  # the worst runs first; summary.csv has them all

_STYLE = """
body { font-family: system-ui, -apple-system, "DejaVu Sans", sans-serif; margin: 2em auto; max-width: 1400px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 2em; }
code { background: #f3f3f3; padding: 0.15em 0.35em; border-radius: 3px; }
.badges span { display: inline-block; margin: 0.2em 0.4em 0.2em 0; padding: 0.3em 0.7em; border-radius: 1em;
               color: white; font-weight: 600; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
table { border-collapse: collapse; font-size: 0.82em; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 0.25em 0.6em; text-align: right; white-space: nowrap; }
th { position: sticky; top: 0; background: #fafafa; cursor: pointer; user-select: none; white-space: normal;
     vertical-align: bottom; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
td.text, th.text { text-align: left; }
.tablewrap { max-height: 70vh; overflow: auto; border: 1px solid #ddd; }
"""

_SCRIPT = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var headers = table.querySelectorAll("th");
  headers.forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = !th.classList.contains("sorted-asc");
      headers.forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
      th.classList.add(asc ? "sorted-asc" : "sorted-desc");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute("data-v"), y = b.cells[col].getAttribute("data-v");
        var nx = parseFloat(x), ny = parseFloat(y);
        var cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : String(x).localeCompare(String(y));
        return asc ? cmp : -cmp;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _cell(value) -> tuple[str, str, bool]:
    """(shown text, sort key, is text) of one table value."""
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return "", "", False
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower(), str(int(bool(value))), True
    if isinstance(value, (int, np.integer)):
        return str(value), str(value), False
    if isinstance(value, (float, np.floating)):
        if math.isinf(value):
            return ("+inf" if value > 0 else "-inf"), ("1e999" if value > 0 else "-1e999"), False
        return f"{value:.4g}", repr(float(value)), False
    return str(value), str(value), True


def _table(runs: pd.DataFrame, columns: list[str]) -> str:
    # Long column names may break after '_' or '.', so that a narrow number column is not as wide as its name.
    head = "".join(f'<th class="{"text" if not pd.api.types.is_numeric_dtype(runs[c]) else ""}">'
                   f'{html.escape(c).replace("_", "_<wbr>").replace(".", ".<wbr>")}</th>' for c in columns)
    rows = []
    for values in runs[columns].itertuples(index=False, name=None):
        cells = []
        for c, v in zip(columns, values):
            text, key, is_text = _cell(v)
            style = f' style="color:{VERDICT_COLORS[v]};font-weight:600"' if c == "verdict" and v in VERDICT_COLORS else ""
            cells.append(f'<td class="{"text" if is_text else ""}" data-v="{html.escape(key)}"{style}>{html.escape(text)}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="sortable"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _sweeps_html(command: str, merged: list[tuple[str, str]]) -> str:
    if len(merged) <= 1:
        return f'<p>Sweep: <code>{html.escape(command or "(no Hydra record of the command)")}</code></p>'
    items = "".join(f"<li><code>{html.escape(d)}</code>: <code>{html.escape(c or '(no Hydra record of the command)')}"
                    "</code></li>" for d, c in merged)
    return f"<p>This report merges {len(merged)} sweeps:</p><ul>{items}</ul>"


def write_index(out: Path, runs: pd.DataFrame, shown: list[str], images: list[tuple[str, str, str]], command: str,
                counts: dict[str, int], layout: Layout, sweep_dir: Path, merged: list[tuple[str, str]] = (),
                notes: list[str] = ()) -> Path:
    """Write ``out/index.html`` and return its path. ``merged``: (directory, command) of each sweep when the
    report merges several (``command`` is then unused); ``notes``: paragraphs of plain text under the counts."""
    badges = "".join(f'<span style="background:{VERDICT_COLORS[v]}">{n} {v}</span>' for v, n in counts.items())
    figures = []
    for name, title, caption in images:
        data = base64.b64encode((out / name).read_bytes()).decode()
        figures.append(f'<h2>{html.escape(title)}</h2><figure><img src="data:image/png;base64,{data}" '
                       f'alt="{html.escape(title)}"><figcaption>{html.escape(caption)} '
                       f'(<a href="{html.escape(name)}">{html.escape(name)}</a>)</figcaption></figure>')
    worst = runs.assign(_sev=runs["verdict"].map(SEVERITY).fillna(-1)).sort_values("_sev", ascending=False, kind="stable")
    shown_runs = worst.head(MAX_TABLE_ROWS)
    note = (f"<p>The {MAX_TABLE_ROWS} worst of {len(runs)} runs; all of them are in "
            f'<a href="summary.csv">summary.csv</a>.</p>' if len(runs) > MAX_TABLE_ROWS else
            '<p>Click a column to sort. The same table, with every config column: <a href="summary.csv">summary.csv</a>.</p>')
    layout_text = (f"x = <code>{html.escape(str(layout.x))}</code>, y = <code>{html.escape(str(layout.y))}</code>"
                   + (f", facets = <code>{html.escape(', '.join(layout.facets))}</code>" if layout.facets else ""))
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradsweep report: {html.escape(sweep_dir.name)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_STYLE}</style></head>
<body>
<h1>gradsweep report</h1>
<p><code>{html.escape(str(sweep_dir))}</code></p>
{_sweeps_html(command, merged)}
<p class="badges">{badges}</p>
<p>{len(runs)} runs; heatmap layout: {layout_text}; seeds (<code>train.seed</code>) aggregated by median.</p>
{"".join(f"<p>{html.escape(n)}</p>" for n in notes)}
{"".join(figures)}
<h2>Runs</h2>
{note}
<div class="tablewrap">{_table(shown_runs, shown)}</div>
<script>{_SCRIPT}</script>
</body></html>
"""
    path = out / "index.html"
    path.write_text(page, encoding="utf-8")
    return path
