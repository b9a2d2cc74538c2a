"""Thin wrapper: ``python scripts/report.py <sweep_dir>`` = ``python -m gradsweep.report <sweep_dir>``."""

from gradsweep.report import main

if __name__ == "__main__":
    main()
