"""gradsweep.report.html on its own: a self-contained page (figures inlined), every value escaped, the worst runs first."""

from __future__ import annotations

import base64
import re

import pandas as pd

from gradsweep.report import html as report_html
from gradsweep.report.layout import Layout

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def page(tmp_path, runs: pd.DataFrame, **kw) -> str:
    (tmp_path / "fig.png").write_bytes(PNG)
    args = dict(runs=runs, shown=list(runs.columns), images=[("fig.png", "Ratio <heatmap>", "caption & more")],
                command="python -m gradsweep -m model.depth=2,3", counts={"healthy": 1, "diverged": 1},
                layout=Layout("model.depth", None), sweep_dir=tmp_path / "sweep")
    args.update(kw)
    return report_html.write_index(tmp_path, **args).read_text()


def runs_frame(n: int = 2) -> pd.DataFrame:
    return pd.DataFrame({"run_id": [f"r{i}" for i in range(n)], "verdict": ["healthy", "diverged"] * (n // 2),
                         "model.depth": list(range(n)), "+tag": ["<script>alert(1)</script>", "a&b"] * (n // 2),
                         "final_loss": [0.5, float("nan")] * (n // 2)})


def test_figures_are_inlined_and_text_escaped(tmp_path):
    text = page(tmp_path, runs_frame())
    data = re.search(r'src="data:image/png;base64,([^"]+)"', text).group(1)
    assert base64.b64decode(data) == PNG
    assert "<script>alert(1)" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "Ratio &lt;heatmap&gt;" in text and "caption &amp; more" in text
    assert "python -m gradsweep -m model.depth=2,3" in text
    assert "1 healthy" in text and "1 diverged" in text


def test_worst_runs_first_and_a_note_when_cut(tmp_path, monkeypatch):
    text = page(tmp_path, runs_frame())
    rows = re.findall(r"<tr>(.*?)</tr>", text.split("<tbody>")[1])
    assert "r1" in rows[0] and "r0" in rows[1]  # diverged before healthy
    monkeypatch.setattr(report_html, "MAX_TABLE_ROWS", 3)
    text = page(tmp_path, runs_frame(6))
    assert len(re.findall(r"<tr>", text.split("<tbody>")[1])) == 3
    assert "The 3 worst of 6 runs" in text and 'href="summary.csv"' in text


def test_missing_values_are_empty_cells(tmp_path):
    text = page(tmp_path, runs_frame())
    assert ">nan<" not in text.lower() and ">&lt;NA&gt;<" not in text
