"""Thin wrapper: ``python scripts/report.py <sweep_dir>`` = ``python -m gradsweep.report <sweep_dir>``."""

from gradsweep.report.build import main
from gradsweep.shutdown import run_and_exit

if __name__ == "__main__":
    run_and_exit(main)
