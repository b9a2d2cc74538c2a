"""The README stays true: its first two commands, CI running the second, and the documented schema."""

from __future__ import annotations

import re
from pathlib import Path

from gradsweep.schema import ID_COLUMNS, LAYER_STATS, RESULT_COLUMNS, STEP_COLUMNS

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
