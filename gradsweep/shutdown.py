"""A command's end without the interpreter's teardown.

Once a command has written and closed its files, Python still tears down every module and torch's C++ state
before the process exits: ~1 s after ``import torch`` on the 2-core machine of BENCHMARKS.md (0.02 s without
torch), paid by every sweep, report and study for nothing. :func:`run_and_exit` ends a command the way the
interpreter would, minus that teardown.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn


def run_and_exit(main: Callable[[], Any]) -> NoReturn:
    """Run ``main`` as the program, then exit as Python's own exit does, minus the teardown.

    In the interpreter's order: other non-daemon threads are joined (idle thread pools woken first), atexit
    handlers run (logging flushes and closes its files; multiprocessing, submitit and tqdm clean up), stdout and
    stderr are flushed, then the process exits with ``main``'s status: 0, a ``SystemExit`` code, or 1 after
    printing a non-integer one (120 where the final flush of stdout or stderr fails, as Python's). An exception
    that is not ``SystemExit`` propagates as usual, with its traceback and the full teardown.
    """
    try:
        main()
        code: Any = 0
    except SystemExit as e:
        code = e.code
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    # Private: what the interpreter calls first at exit: wakes concurrent.futures' idle workers (its own atexit
    # hooks), then joins the non-daemon threads; there is no public way.
    threading._shutdown()
    # Private: atexit has no public way to run its handlers before the interpreter's own exit, which is what
    # os._exit skips.
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        if stream is None:  # started with the stream closed (>&-)
            continue
        try:
            stream.flush()
        except OSError:  # output lost (a full disk, a closed pipe): Python's own exit says so with status 120
            status = status or 120
        except ValueError:  # a stream the program closed: nothing left to write
            pass
    # Not private despite its name: os._exit is the documented exit without the interpreter's cleanup. The low
    # byte is all the OS keeps of an exit status.
    os._exit(status & 0xFF)
