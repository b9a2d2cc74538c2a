"""The compiled engine's programs, saved whole: a later process loads them instead of compiling them again.

``torch.compile`` caches what inductor generates (its FX-graph and AOTAutograd caches), but a new process still
traces every program with dynamo and looks each graph up: ~7-11 s at the article's shape, most of a rerun's wait.
Here each program is compiled ahead of time for the arguments of its first call (``torch.compile(...).aot_compile``,
fullgraph) and saved, guards and generated code together, to ``$GRADSWEEP_CACHE_DIR/programs`` (default
``~/.cache/gradsweep/programs``); a later process with the same key loads it in well under a second (the first load
in a process also imports ``torch._dynamo``, ~2 s). The key is everything the program depends on: what it computes
(the caller's description: shape, layout, Linear form, compile options), its arguments' shapes, strides and dtypes,
the Python values among them, gradsweep's own source, the torch and Python versions, the CPU, the thread count (which
the program's guards check) and inductor's ``TORCHINDUCTOR_*`` settings.

The functions are closures: what their closure holds is handed over as external data, built fresh by the loading
process, never pickled. The ahead-of-time API is experimental in torch 2.13: where it fails (a torch that lacks it,
a program it cannot save), the program is compiled by ``torch.compile`` in this process only, with one log line.
On CUDA (CUDA graphs through inductor's ``reduce-overhead`` mode) programs are compiled in the process for now.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from gradsweep.engine.kernels.build import cache_root, cpu_id, package_dir

log = logging.getLogger(__name__)

LOADED: dict[str, int] = {"loaded": 0, "compiled": 0, "in_process": 0}
"""How this process's programs came to be (a rerun of a shape loads every program: tests/test_compiled.py)."""


def program_dir():
    return cache_root() / "programs"


@functools.cache
def source_hash() -> str:
    """gradsweep's own source (every .py and .cpp file of the package): a program compiled from other code is not
    loaded."""
    h = hashlib.sha256()
    root = package_dir()
    todo = [root]
    while todo:
        for entry in sorted(todo.pop().iterdir(), key=lambda e: e.name):
            if entry.is_dir():
                todo.append(entry)
            elif entry.name.endswith((".py", ".cpp")):
                h.update(entry.name.encode() + b"\0" + entry.read_bytes())
    return h.hexdigest()


def spec(x: Any) -> Any:
    """What a compiled program specialises on in an argument: tensors' shapes, strides, dtypes, devices and
    requires_grad, containers' structure, and the value of anything else (a Python number is baked in)."""
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), tuple(x.stride()), str(x.dtype), x.device.type, x.requires_grad)
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, tuple(spec(v) for v in x))
    if isinstance(x, dict):
        return ("D", tuple((k, spec(v)) for k, v in x.items()))
    return ("V", repr(x))


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""


class Program:
    """``fn`` compiled once per argument spec, from the program cache where a process before compiled it.

    ``what``: a description of everything ``fn`` computes that its arguments do not show (its closure's
    configuration), part of the key. ``how``: ``torch.compile``'s options."""

    def __init__(self, fn: Callable, name: str, what: str, how: dict[str, Any], device: torch.device):
        self.fn, self.name, self.what, self.how, self.device = fn, name, what, how, device
        self._by_spec: dict[Any, Callable] = {}

    def __call__(self, *args):
        # The thread count and grad mode too: a program's guards check them (and refuse, rather than recompile),
        # and each group of a sweep may get another thread count (device.set_threads).
        key = (spec(args), torch.get_num_threads(), torch.is_grad_enabled())
        compiled = self._by_spec.get(key)
        if compiled is None:
            compiled = self._by_spec[key] = self._prepare(args, key[0])
        return compiled(*args)

    def _external(self) -> dict[str, Any]:
        """The closure's contents, by name: handed to save and load instead of pickled."""
        return {n: c.cell_contents for n, c in zip(self.fn.__code__.co_freevars, self.fn.__closure__ or ())}

    def _key(self, arg_spec: Any) -> str:
        inductor_env = sorted((k, v) for k, v in os.environ.items() if k.startswith("TORCHINDUCTOR_")
                              and k not in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_COMPILE_THREADS"))
        parts = (self.name, self.what, repr(sorted(self.how.items())), repr(arg_spec), torch.__version__, sys.version,
                 cpu_id(), torch.get_num_threads(), source_hash(), inductor_env)
        return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]

    def _in_process(self) -> Callable:
        LOADED["in_process"] += 1
        return torch.compile(self.fn, dynamic=False, **self.how)

    def _prepare(self, args: tuple, arg_spec: Any) -> Callable:
        if self.device.type != "cpu":
            return self._in_process()
        path = program_dir() / f"{self.name}-{self._key(arg_spec)}.bin"
        t0 = time.perf_counter()
        if path.exists():
            try:
                with open(path, "rb") as f:
                    loaded = torch.compiler.load_compiled_function(f, f_globals=self.fn.__globals__,
                                                                   external_data=self._external())
                if loaded.guard_check(*args):
                    LOADED["loaded"] += 1
                    log.info("loaded the compiled %s program in %.2f s: %s", self.name, time.perf_counter() - t0, path)
                    return loaded
                log.info("compiled %s program %s does not fit these arguments: compiling it again", self.name, path)
            except Exception as e:  # noqa: BLE001 - experimental API: any failure means compiling again
                log.info("could not load the compiled %s program %s (%s): compiling it again", self.name, path, e)
        try:
            import torch._dynamo as dynamo  # (as torch._dynamo, it would make ``torch`` a local name of this function)

            with dynamo.config.patch(enable_aot_compile=True):
                aot = torch.compile(self.fn, fullgraph=True, dynamic=False, **self.how).aot_compile((args, {}))
        except Exception as e:  # noqa: BLE001 - experimental API: fall back to compiling in this process only
            log.warning("could not compile the %s program ahead of time (%s: %s): compiling it in this process only",
                        self.name, type(e).__name__, _first_line(e))
            return self._in_process()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            aot.save_compiled_function(str(path), external_data=self._external())  # written atomically
        except Exception as e:  # noqa: BLE001 - a cache that cannot be written: the compiled program still serves
            log.warning("could not save the compiled %s program to %s (%s: %s): it serves this process only",
                        self.name, path, type(e).__name__, _first_line(e))
            LOADED["in_process"] += 1
            return aot
        LOADED["compiled"] += 1
        log.info("compiled the %s program in %.1f s and saved it: %s", self.name, time.perf_counter() - t0, path)
        return aot
