from gradsweep.shutdown import run_and_exit
from gradsweep.sweep.cli import main

if __name__ == "__main__":
    run_and_exit(main)
