"""gradsweep's exceptions: every error a user can fix is one of these, its message one line.

Library code raises them; only the commands (``gradsweep.sweep.cli``, ``gradsweep.report.build``, ``gradsweep.tune.cli``)
and the Hydra plugin's ``launch`` (the boundary Hydra calls, which would print anything else as a traceback)
turn them into ``gradsweep: error: <message>`` and exit status ``GradsweepError.exit_code``.
"""

from __future__ import annotations


class GradsweepError(Exception):
    """A failure the user can fix (bad input, a sweep directory in another state); one line, exit status 2."""

    exit_code = 2


class ConfigError(GradsweepError, ValueError):
    """A bad config value; its message is one line naming the key, the value and what is valid."""


class ResumeError(GradsweepError):
    """A sweep directory that holds runs of another configuration, or jobs of another start still training them."""


class SetupError(GradsweepError):
    """Something the chosen setting needs is missing from this installation (e.g. submitit for a cluster launcher)."""


def first_line(e: BaseException) -> str:
    """An exception as one line for the user: the first line of its message, or its type when it has none."""
    text = str(e).strip()
    return text.splitlines()[0].strip() if text else type(e).__name__
