"""gradsweep.engine.programs: compiled programs saved whole and loaded by a later process, on a small closure (the
training programs' own round trip is tests/test_compiled.py::test_a_second_process_compiles_nothing)."""

from __future__ import annotations

import pytest
import torch

from gradsweep.engine import programs
from gradsweep.engine.compiled import has_cxx
from gradsweep.engine.programs import Program

pytestmark = pytest.mark.skipif(not has_cxx(), reason="torch.compile on the CPU needs a C++ compiler")


def make(scale: float):
    """A closure like the engine's programs: what it computes depends on a captured value."""
    factor = torch.full((1,), scale, dtype=torch.float64)  # (a captured 0-dim tensor: torch 2.13 cannot save it)

    def fn(x: torch.Tensor, n: int) -> torch.Tensor:
        return (x[:, :n] * factor).sin().sum(dim=1)  # n: a Python number the program specialises on

    return fn


def test_saved_then_loaded_and_refused_where_it_does_not_fit(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("GRADSWEEP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(programs, "LOADED", {"loaded": 0, "compiled": 0, "in_process": 0})
    cpu = torch.device("cpu")
    x = torch.randn(5, 7, dtype=torch.float64)
    first = Program(make(2.0), "probe", "scale 2", {}, cpu)
    expected = (x[:, :3] * 2.0).sin().sum(dim=1)
    torch.testing.assert_close(first(x, 3), expected, rtol=1e-15, atol=0)
    saved = list((tmp_path / "programs").glob("probe-*.bin"))
    assert len(saved) == 1 and programs.LOADED == {"loaded": 0, "compiled": 1, "in_process": 0}

    # A new Program of the same function (as a later process makes it): loaded, not compiled, same numbers.
    again = Program(make(2.0), "probe", "scale 2", {}, cpu)
    torch.testing.assert_close(again(x, 3), expected, rtol=0, atol=0)
    assert programs.LOADED["loaded"] == 1 and programs.LOADED["compiled"] == 1
    # Its closure is this process's: the loaded program reads it, nothing captured was pickled.
    other = Program(make(5.0), "probe", "scale 2", {}, cpu)  # (a caller that lied about what it computes)
    torch.testing.assert_close(other(x, 3), (x[:, :3] * 5.0).sin().sum(dim=1), rtol=1e-15, atol=0)

    # Another shape, another Python number baked in, another description, dtype or thread count: another key.
    probe = Program(make(2.0), "probe", "scale 2", {}, cpu)
    keys = {probe._key(programs.spec(a)) for a in ((x, 3), (x[:4], 3), (x, 4), (x.float(), 3), (x.t(), 3))}
    keys.add(Program(make(2.0), "probe", "scale 2, again", {}, cpu)._key(programs.spec((x, 3))))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        keys.add(probe._key(programs.spec((x, 3))))
    finally:
        torch.set_num_threads(threads)
    assert len(keys) == 7 and saved[0].name == f"probe-{probe._key(programs.spec((x, 3)))}.bin"

    # A damaged file is compiled again (one log line), not an error.
    saved[0].write_bytes(b"not a program")
    with caplog.at_level("INFO", logger="gradsweep.engine.programs"):
        torch.testing.assert_close(Program(make(2.0), "probe", "scale 2", {}, cpu)(x, 3), expected, rtol=0, atol=0)
    assert programs.LOADED["compiled"] == 2 and any("could not load" in r.message for r in caplog.records)


def test_where_the_ahead_of_time_api_fails_it_compiles_in_the_process(tmp_path, monkeypatch, caplog):
    import torch._dynamo.aot_compile as aot

    def unsupported(*args, **kwargs):
        raise RuntimeError("not supported by this torch")

    monkeypatch.setenv("GRADSWEEP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(programs, "LOADED", {"loaded": 0, "compiled": 0, "in_process": 0})
    monkeypatch.setattr(aot, "aot_compile_fullgraph", unsupported)
    x = torch.randn(5, 7, dtype=torch.float64)
    with caplog.at_level("WARNING", logger="gradsweep.engine.programs"):
        out = Program(make(2.0), "probe", "scale 2", {}, torch.device("cpu"))(x, 3)
    torch.testing.assert_close(out, (x[:, :3] * 2.0).sin().sum(dim=1), rtol=1e-15, atol=0)
    assert programs.LOADED == {"loaded": 0, "compiled": 0, "in_process": 1}
    warned = [r.message for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "not supported by this torch" in warned[0] and "in this process only" in warned[0]
    assert not (tmp_path / "programs").exists() or not list((tmp_path / "programs").iterdir())  # nothing half-written


def test_a_program_serves_each_thread_count_it_is_called_with(tmp_path, monkeypatch):
    """A compiled program's guards check torch's thread count (and refuse rather than recompile), and each group of a
    sweep may get another one (device.set_threads): the same Program called under 1 and then 2 threads."""
    monkeypatch.setenv("GRADSWEEP_CACHE_DIR", str(tmp_path))
    x = torch.randn(5, 7, dtype=torch.float64)
    probe = Program(make(2.0), "probe", "scale 2", {}, torch.device("cpu"))
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            torch.testing.assert_close(probe(x, 3), (x[:, :3] * 2.0).sin().sum(dim=1), rtol=1e-15, atol=0)
    finally:
        torch.set_num_threads(threads)
    assert len(list((tmp_path / "programs").glob("probe-*.bin"))) == 2
