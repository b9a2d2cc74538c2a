"""Thin wrapper: ``python scripts/bench.py`` = ``python -m gradsweep.bench``."""

from gradsweep.bench import main

if __name__ == "__main__":
    main()
