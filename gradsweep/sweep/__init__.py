"""Running a sweep: the command (``cli``), the checks before anything trains (``preflight``), every job's config
composed at a fraction of Hydra's cost (``compose``), the jobs planned into fused groups (``group``) and launched
(``launch``: in this process, or as submitit jobs through ``submit``), and Hydra's callbacks (``callbacks``: the
progress bar and the end-of-sweep lines).

Imports the engine, results and config, never the report or the tuner."""

from gradsweep.lazy import exports

_WHERE = {"check_overrides": "preflight", "plan": "group", "run_group": "group", "to_run_cfg": "compose"}
__all__ = sorted(_WHERE)
__getattr__ = exports(__name__, _WHERE)
