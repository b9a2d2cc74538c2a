"""The README stays true: its first two commands, CI running the second, and the documented schema."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from conftest import scaled

from gradsweep.results.schema import ID_COLUMNS, LAYER_STATS, RESULT_COLUMNS, STEP_COLUMNS

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
REFERENCE = (REPO / "docs" / "reference.md").read_text()


def _first_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    return [ln.strip() for ln in block.splitlines() if ln.strip()]


def test_first_two_commands():
    main_job, tests = _first_commands()[:2]
    assert "python -m gradsweep -m model.depth=2,10,30 init=xavier,kaiming && python -m gradsweep.report" in main_job
    assert tests.endswith("pytest")
    assert tests in (REPO / ".ci" / "run").read_text()


def test_every_column_is_documented():
    for col in [*ID_COLUMNS, *RESULT_COLUMNS, *STEP_COLUMNS, *LAYER_STATS]:
        assert f"`{col}`" in REFERENCE, col


def test_the_pictures_the_docs_show_exist():
    for doc, text in ((REPO, README), (REPO / "docs", REFERENCE)):
        for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
            assert (doc / target).is_file(), target


def _example(title: str) -> tuple[str | None, list[str], list[str]]:
    """The README's example under ``title``: its module file (a python block, if any), its commands, and what it
    prints (the plain block after them)."""
    text = README[README.index(title):]
    text = text[:text.index("\n**", 1)]
    module = re.search(r"```python\n(.*?)```", text, re.S)
    bash = re.search(r"```bash\n(.*?)```", text, re.S)
    commands = bash.group(1).strip().splitlines()
    printed = re.search(r"\n```\n(.*?)```", text[bash.end():], re.S).group(1).strip().splitlines()
    return module and module.group(1), commands, printed


def _agree(shown: list[str], got: list[str]) -> None:
    """The counts line and the fixed overrides exactly; each table row's words exactly and its numbers to the
    rounding another CPU's float32 gives (diverged rows: the verdict only, the numbers there are noise)."""
    assert shown[0].split(": ", 1)[1] == got[0].split(": ", 1)[1], (shown[0], got[0])
    assert shown[1:3] == got[1:3], (shown[1:3], got[1:3])
    assert len(shown) == len(got), got
    for a, b in zip(shown[3:], got[3:]):
        words_a, words_b = a.split(), b.split()
        assert len(words_a) == len(words_b), (a, b)
        for x, y in zip(words_a, words_b):
            try:
                fx, fy = float(x), float(y)
            except ValueError:
                assert x == y, (a, b)
                continue
            if "diverged" not in words_a:
                assert abs(fx - fy) <= 0.05 * max(abs(fx), 1.0), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("title", ["**Your own data.**", "**Your own model.**"])
def test_the_own_data_and_own_model_examples_print_what_the_readme_shows(title, tmp_path):
    module, commands, printed = _example(title)
    if module:
        (tmp_path / "mynets.py").write_text(module)
        assert len(module.strip().splitlines()) <= 20  # a short file a user copies
    for command in commands:
        out = subprocess.run(command, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=scaled(600),
                             env={**os.environ, "PYTHONPATH": ""})
        assert out.returncode == 0, out.stderr[-3000:]
    got = [ln for ln in out.stdout.strip().splitlines() if not ln.startswith("[")]
    _agree(printed, got)
