"""engine=compiled beyond the reference tests (tests/test_train.py runs those on both engines): its buckets, the
auto rule, NaN isolation, run identity, and inductor's on-disk cache across processes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_cfg, scaled

from gradsweep.config.identity import config_hash
from gradsweep.config.sections import ConfigError
from gradsweep.engine import compiled
from gradsweep.engine.compiled import AUTO_MIN_RUN_STEPS_CPU, AUTO_MIN_RUN_STEPS_CPU_NO_KERNEL, bucket, resolve_engine
from gradsweep.engine.train import train_group


def test_buckets_pad_at_most_an_eighth_and_are_shared():
    for runs in range(1, 5000):
        b = bucket(runs)
        assert b >= max(2, runs) and (runs <= 8 or b - runs <= runs / 8), runs
    assert bucket(1000) == bucket(1024) == 1024 and bucket(961) == 1024 and bucket(960) == 960
    assert len({bucket(r) for r in range(513, 1025)}) == 8  # 512 group sizes, eight programs


def test_auto_compiles_where_it_pays():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_engine("auto", 6, 500, "float32", cpu) == "eager"  # the quick start: compiling would not pay
    assert resolve_engine("auto", 10_000, 1000, "float64", cpu) == "eager"  # no CPU GEMM template in float64
    assert resolve_engine("auto", 6, 500, "float32", cuda) == "eager"  # until a GPU has run gpu_check.sh
    assert resolve_engine("eager", 10_000, 1000, "float32", cuda) == "eager"
    assert resolve_engine("compiled", 1, 1, "float64", cpu) == "compiled"
    # where the fused kernel applies (no norm layers) nothing is compiled per shape: compiled whatever the size
    assert resolve_engine("auto", 1, 10, "float64", cpu, fused=True) == "compiled"
    assert resolve_engine("eager", 1000, 1000, "float32", cpu, fused=True) == "eager"


def test_a_group_without_norm_layers_trains_through_the_fused_kernel_unpadded():
    if compiled.linear_form(torch.device("cpu")) != "kernel":
        pytest.skip("needs gradsweep's kernels (a C++ compiler)")
    cfgs = [make_cfg(model={"depth": 2}, train={"steps": 3, "seed": s}) for s in range(9)]
    trace = train_group(cfgs)  # engine=auto
    assert trace.engine == "compiled" and trace.final_loss.shape == (9,)
    assert train_group([make_cfg(model={"depth": 2, "norm": "layernorm"}, train={"steps": 3})]).engine == "eager"


def test_auto_counts_on_the_kernels_making_eager_fast(monkeypatch):
    # With the kernels eager runs the same programs op by op (compiling gains -16% to +15%): auto stays eager; without
    # them eager is the baddbmm loop (compiling gains ~2.3x) and auto compiles big groups.
    cpu = torch.device("cpu")
    if compiled.linear_form(cpu) == "kernel":
        assert AUTO_MIN_RUN_STEPS_CPU is None
        assert resolve_engine("auto", 100_000, 10_000, "float32", cpu) == "eager"
    monkeypatch.setattr(compiled, "linear_form", lambda device: "bmm")
    assert resolve_engine("auto", 1000, AUTO_MIN_RUN_STEPS_CPU_NO_KERNEL // 1000, "float32", cpu) == "compiled"
    assert resolve_engine("auto", 1000, AUTO_MIN_RUN_STEPS_CPU_NO_KERNEL // 1000 - 1, "float32", cpu) == "eager"


def test_without_a_cxx_compiler_cpu_groups_stay_eager(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    cpu = torch.device("cpu")
    assert resolve_engine("auto", 10_000, 1000, "float32", cpu) == "eager"
    with pytest.raises(ConfigError, match="engine='compiled' is not valid here: torch.compile on the CPU needs a C"):
        resolve_engine("compiled", 8, 10, "float32", cpu)


def test_engine_is_how_not_what():
    eager, compiled = make_cfg(engine="eager"), make_cfg(engine="compiled")
    assert config_hash(eager) == config_hash(compiled) == config_hash(make_cfg())
    with pytest.raises(ConfigError, match="engine='jit' is not valid; valid values: auto, eager, compiled"):
        make_cfg(engine="jit")


# The fused kernel (no norm layers) and torch.compile'd step programs (norm layers: the shape of test_train's
# momentum test, compiled once on this worker)
NETS = {"fused": ({"depth": 4}, {}),
        "programs": ({"depth": 3, "norm": "batchnorm"}, {"momentum": 0.9, "weight_decay": 1e-3})}


@pytest.mark.slow
@pytest.mark.xdist_group("compiled")  # one worker: the programs compiled once serve every compiled test there
@pytest.mark.parametrize("net", NETS)
def test_a_diverging_neighbour_changes_nothing_compiled(net):
    """Same program (same stack size), once beside a run that diverges and once beside a healthy one: the
    healthy run's numbers are the same bits."""
    model, optim = NETS[net]

    def cfg(**kw):
        return make_cfg(model=model, train={"steps": 40, "dtype": "float64", **kw.pop("train", {})},
                        optim={"lr": kw.pop("lr", 0.02), **optim}, engine="compiled", **kw)
    healthy = cfg(train={"seed": 1})
    blowup = cfg(init={"name": "large", "scheme": "normal", "std": 30.0}, lr=0.5)
    beside_bad = train_group([blowup, healthy])
    beside_good = train_group([cfg(train={"seed": 2}), healthy])
    assert beside_bad.diverged_step[0] >= 0 and beside_bad.diverged_step[1] == -1
    for field in ("loss", "grad_norm"):
        np.testing.assert_array_equal(getattr(beside_bad, field)[:, 1], getattr(beside_good, field)[:, 1])
    np.testing.assert_array_equal(beside_bad.layer[:, 1], beside_good.layer[:, 1])
    assert beside_bad.final_loss[1] == beside_good.final_loss[1]
    # and the compiled numbers are eager's to rounding
    eager = train_group([dataclasses.replace(c, engine="eager") for c in (blowup, healthy)])
    np.testing.assert_allclose(beside_bad.loss[:, 1], eager.loss[:, 1], rtol=1e-9)
    assert beside_bad.diverged_step[0] == eager.diverged_step[0]


def _programs_shape_cfg():
    """The torch.compile'd step programs of test_train's momentum test (a BatchNorm net: the fused kernel does not
    apply; two runs, float64): compiled once on this worker."""
    model, optim = NETS["programs"]
    return make_cfg(model=model, optim={"lr": 0.02, **optim}, train={"steps": 3, "dtype": "float64"},
                    engine="compiled")


CACHE_PROBE = """
import json
from torch._dynamo.utils import counters
from test_compiled import _programs_shape_cfg
from gradsweep.engine.programs import LOADED
from gradsweep.engine.train import train_group
trace = train_group([_programs_shape_cfg()])
print(json.dumps({"programs": LOADED, "traced": counters["stats"]["unique_graphs"],
                  "miss": counters["inductor"]["fxgraph_cache_miss"],
                  "loss": trace.loss[:, 0].tolist(), "layer": trace.layer[:, 0].tolist()}))
"""


@pytest.mark.slow
@pytest.mark.xdist_group("compiled")
def test_a_second_process_compiles_nothing():
    """This process compiles the shape (or an earlier test on this worker did) and saves its programs
    (gradsweep.engine.programs); a new process of the same shape loads both, traces and compiles nothing, and computes
    the same bits."""
    here = train_group([_programs_shape_cfg()])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    assert env.get("TORCHINDUCTOR_CACHE_DIR")  # set by gradsweep.engine.compiled before compiling (or by the caller)
    out = subprocess.run([sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, check=True,
                         timeout=scaled(600)).stdout.strip().splitlines()[-1]
    there = json.loads(out)
    assert there["programs"] == {"loaded": 2, "compiled": 0, "in_process": 0}, there
    assert there["traced"] == 0 and there["miss"] == 0, there
    assert there["loss"] == here.loss[:, 0].tolist()
    np.testing.assert_array_equal(np.array(there["layer"]), here.layer[:, 0])


def test_its_float32_statistics_keep_a_signal_whose_squares_underflow(monkeypatch):
    """Depth-30 sigmoid: |dL/dh_1| ~ 1e-26, whose squares float32 rounds to 0. The compiled step's statistics (the
    kernel's sums of (dL/dh * scale)^2 and layer_sums' scaled sums) record what float64 records. The programs run
    as written, without torch.compile (their Python is what inductor compiles; compiling this shape costs ~50 s)."""
    from gradsweep.engine import compiled
    from gradsweep.results.tables import build_tables

    if compiled.linear_form(torch.device("cpu")) != "kernel":
        pytest.skip("needs the stacked-Linear kernel (a C++ compiler)")
    from gradsweep.engine.programs import Program

    monkeypatch.setattr(compiled, "_PROGRAMS", {})
    monkeypatch.setattr(Program, "_prepare", lambda self, args, spec: self.fn)

    def run(dtype, engine):
        cfg = make_cfg(model={"depth": 30, "activation": "sigmoid"}, train={"steps": 3, "dtype": dtype}, engine=engine)
        return build_tables([cfg], train_group([cfg]))

    r64, s64 = run("float64", "eager")
    assert 1e-30 < s64[s64.layer == 1].hgrad_norm.iloc[0] < 1e-20
    for engine in ("compiled", "eager"):  # the fused kernel's sums; the step programs' (op by op)
        r32, s32 = run("float32", engine)
        for col in ("hgrad_norm", "wgrad_norm", "wgrad_rms", "update_ratio", "out_rms"):
            np.testing.assert_allclose(s32[col], s64[col], rtol=1e-3, err_msg=f"{engine}: {col}")
        assert r32.grad_ratio_log10.iloc[0] == pytest.approx(r64.grad_ratio_log10.iloc[0], abs=1e-3)
