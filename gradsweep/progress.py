"""Progress bars (tqdm) that stay off where nobody watches them.

A bar redraws itself with carriage returns and cursor moves: on a terminal that is progress, in a file it is noise
(67 KB of it for the quick start's 6 runs). Bars are drawn when stderr is a terminal, or when the environment
asks for them (``GRADSWEEP_PROGRESS=1``, e.g. a wrapper that parses them), and never with ``quiet``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm

ENV = "GRADSWEEP_PROGRESS"


def wanted(quiet: bool = False) -> bool:
    """Whether a progress bar should be drawn."""
    if quiet or os.environ.get(ENV) == "0":
        return False
    return os.environ.get(ENV) == "1" or sys.stderr.isatty()


def bar(*, quiet: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar, disabled unless :func:`wanted`."""
    return tqdm(disable=not wanted(quiet), **kwargs)
