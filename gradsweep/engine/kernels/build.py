"""Building and loading gradsweep's CPU kernels (``csrc/stacked.cpp`` and ``csrc/fused.cpp``; what calls them:
:mod:`gradsweep.engine.kernels.stacked`, :mod:`gradsweep.engine.kernels.fused`).

Each dtype's library is built with the machine's C++ compiler on its first use and cached by source, compiler, flags
and CPU in ``$GRADSWEEP_CACHE_DIR/kernels`` (default ``~/.cache/gradsweep/kernels``), under a file lock so that
processes starting together build it once. ``GRADSWEEP_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-Wno-psabi")
OPENMP = "-fopenmp"  # tried first; a compiler without OpenMP (clang on macOS) builds the kernel single-threaded


def cache_root() -> Path:
    """Where gradsweep keeps what it builds for this machine: $GRADSWEEP_CACHE_DIR, default ~/.cache/gradsweep."""
    return Path(os.environ.get("GRADSWEEP_CACHE_DIR") or str(Path.home() / ".cache" / "gradsweep"))


def cache_dir() -> Path:
    return cache_root() / "kernels"


def compiler() -> str | None:
    """The C++ compiler the kernel is built with: $CXX, else c++, g++ or clang++ on PATH."""
    for name in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cpu_id() -> str:
    """What -march=native depends on: the architecture, and the CPU's model and features (x86's "model name" and
    "flags", ARM's "CPU implementer", "CPU part" and "Features")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    keys = ("model name", "flags", "CPU implementer", "CPU part", "Features")
    keep = sorted({line for line in text.splitlines() if line.startswith(keys)})
    return "\n".join([platform.machine(), platform.processor(), *keep])


def package_dir() -> Path:
    """gradsweep's own directory, from this file (importlib.resources would name a ``gradsweep/`` folder in the
    working directory instead, e.g. a sweep directory called gradsweep, where the editable install's finder comes
    after the working directory on sys.path)."""
    return Path(__file__).resolve().parents[2]


def csrc_dir() -> Path:
    """The kernels' C++ sources, beside this file."""
    return Path(__file__).resolve().parent / "csrc"


SOURCES = ("stacked.cpp", "fused.cpp")  # one translation unit: fused.cpp uses stacked.cpp's vectors and passes


def source() -> bytes:
    return b"\n".join((csrc_dir() / name).read_bytes() for name in SOURCES)


class KernelBuildError(RuntimeError):
    pass


@functools.cache
def library(suffix: str = "f32") -> ctypes.CDLL:
    """The kernels for one dtype (``f32`` or ``f64``), loaded; built first if this machine's cache lacks them (each
    dtype its own library, built on its first use, at -O3, which runs faster than -O2 for its longer build).
    Processes that need one at the same time build it once (a file lock). Raises
    KernelBuildError."""
    cxx = compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler ($CXX, c++, g++ or clang++) on PATH")
    src = source()
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(b"\0".join([src, cxx.encode(), version.encode(), cpu_id().encode(),
                                     " ".join(FLAGS).encode(), suffix.encode()])).hexdigest()[:20]
    path = cache_dir() / f"stacked-{suffix}-{key}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path.with_suffix(".lock")):
            if not path.exists():  # another process may have built it while this one waited
                _build(cxx, src, suffix, path)
    lib = ctypes.CDLL(str(path))
    ptr, i64, cint, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    getattr(lib, f"gs_forward_{suffix}").argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, i64, i64, i64, cint]
    getattr(lib, f"gs_backward_{suffix}").argtypes = [ptr, ptr, i64, ptr, i64, ptr, ptr, ptr, ptr, dbl, i64, i64, i64,
                                                      i64, cint]
    getattr(lib, f"gs_layer_sums_{suffix}").argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, ptr, dbl, i64, i64, i64, cint]
    getattr(lib, f"gs_mlp_step_{suffix}").argtypes = [ptr, i64, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, i64, ptr, ptr,
                                                      ptr, ptr, cint, cint, cint, dbl, dbl, ptr, ptr, ptr, ptr, ptr,
                                                      i64, i64, cint]
    getattr(lib, f"gs_mlp_update_{suffix}").argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, cint, cint, ptr, ptr, ptr,
                                                        ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr, i64,
                                                        ptr, ptr, dbl, i64, i64, cint]
    return lib


@contextlib.contextmanager
def _locked(lock: Path):
    """Holds an exclusive lock on ``lock`` (POSIX); elsewhere nothing (concurrent builds then just repeat the work:
    each replaces the library atomically)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(cxx: str, src: bytes, suffix: str, path: Path) -> None:
    t0 = time.perf_counter()
    log.info("building gradsweep's %s CPU kernels for this machine (once, a few seconds): %s", suffix, path)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        cpp, out = Path(tmp) / "kernels.cpp", Path(tmp) / "k.so"
        cpp.write_bytes(src)
        errors = ""
        only = f"-DGS_ONLY={suffix[1:]}"
        for extra in ((OPENMP,), ()):
            done = subprocess.run([cxx, *FLAGS, *extra, only, "-o", str(out), str(cpp)], capture_output=True, text=True)
            if done.returncode == 0:
                break
            errors = done.stderr
        else:
            raise KernelBuildError(_build_failure(cxx, errors, path.with_suffix(".log")))
        os.replace(out, path)  # atomic: a process beside this one sees the whole file or none
    log.info("built gradsweep's %s CPU kernels in %.1f s", suffix, time.perf_counter() - t0)


def _build_failure(cxx: str, stderr: str, log_path: Path) -> str:
    """One line for a failed build: the compiler's first error (the last line is often only a count of them), and
    the file that keeps its whole output."""
    lines = stderr.strip().splitlines()
    first = next((ln for ln in lines if "error" in ln.lower()), lines[-1] if lines else "no output")
    log_path.write_text(stderr)
    return (f"{cxx} could not build gradsweep/engine/kernels/csrc/{' + '.join(SOURCES)}: {first.strip()} (whole output: "
            f"{log_path})")


@functools.cache
def available() -> bool:
    """Whether the kernel can be used here (building it if needed); logs why not, once per process.
    ``GRADSWEEP_KERNELS=0`` turns it off (both engines then use torch's batched matmul)."""
    if os.environ.get("GRADSWEEP_KERNELS", "1") == "0":
        log.info("GRADSWEEP_KERNELS=0: gradsweep's CPU kernels are off; training uses torch's batched matmul")
        return False
    try:
        library()
    except KernelBuildError as e:
        log.warning("gradsweep's CPU kernels are unavailable (%s): training uses torch's batched matmul (slower)", e)
        return False
    return True
