"""CUDA: run only where a GPU is (scripts/gpu_check.sh runs them on a lent machine); skipped elsewhere."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from conftest import make_cfg

from gradsweep.engine.device import resolve_device
from gradsweep.engine.train import train_group

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")


def _cfgs(device: str, n: int = 8, dtype: str = "float64", steps: int = 100):
    return [make_cfg(model={"depth": 6}, init={"name": "kaiming", "scheme": "kaiming"}, device=device,
                     optim={"lr": 0.005 * (1 + r % 4), "momentum": 0.5 if r % 2 else 0.0},
                     train={"steps": steps, "seed": r, "dtype": dtype, "clip_norm": 1.0 if r % 3 == 0 else None})
            for r in range(n)]


def test_auto_picks_cuda():
    assert resolve_device("auto").type == "cuda"


def test_cuda_matches_cpu_in_float64():
    gpu, cpu = train_group(_cfgs("cuda")), train_group(_cfgs("cpu"))
    np.testing.assert_allclose(gpu.loss, cpu.loss, rtol=1e-9)
    np.testing.assert_allclose(gpu.layer, cpu.layer, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("dtype,rtol,steps", [("float64", 1e-10, 300), ("float32", 1e-4, 100)])
def test_a_run_in_a_group_equals_the_run_alone_on_cuda(dtype, rtol, steps):
    cfgs = _cfgs("cuda", n=16, dtype=dtype, steps=steps)
    together = train_group(cfgs)
    for r in (0, 5, 15):
        alone = train_group([cfgs[r]])
        np.testing.assert_allclose(together.loss[:, r], alone.loss[:, 0], rtol=rtol)


def _host_syncs(cfgs) -> list[str]:
    """The host syncs CUDA reports while ``cfgs`` train a second time (the first compiles and warms up). The
    sharpness is not measured: its Lanczos loop syncs once or twice per iteration (the stop test, eigh's error
    check) at step 0 and the end, which is not per step; test_sharpness_on_cuda_... counts those."""
    cfgs = [dataclasses.replace(c, stats=dataclasses.replace(c.stats, sharpness=False)) for c in cfgs]
    train_group(cfgs)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train_group(cfgs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]


def test_no_host_sync_per_step():
    syncs = _host_syncs(_cfgs("cuda", n=64, dtype="float32", steps=256))
    # Setup, one copy per 64 logged steps, and the end; never one per step.
    assert len(syncs) < 256 // 4, syncs[:5]


def _peak_bytes(cfgs) -> int:
    """GPU memory training the group took at its peak, beyond what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    train_group(cfgs)
    return torch.cuda.max_memory_allocated() - base


def test_device_memory_estimate_bounds_what_a_group_takes():
    from gradsweep.engine.device import device_bytes_per_run, free_device_bytes
    from gradsweep.sweep.group import runs_per_group

    cfgs = _cfgs("cuda", n=256, dtype="float32", steps=80)
    assert _peak_bytes(cfgs) <= len(cfgs) * device_bytes_per_run(cfgs[0]) + 64 * 2**20
    free = free_device_bytes("cuda")
    assert runs_per_group(cfgs[0], 1e6, None, free) == int(free * 0.8 // device_bytes_per_run(cfgs[0]))


def test_compiled_cuda_graph_equals_eager_in_float64():
    cfgs = _cfgs("cuda", n=8, steps=60)
    eager = train_group(cfgs)
    graph = train_group([dataclasses.replace(c, engine="compiled") for c in cfgs])
    assert graph.engine == "compiled"
    np.testing.assert_allclose(graph.loss, eager.loss, rtol=1e-9)
    np.testing.assert_allclose(graph.layer, eager.layer, rtol=1e-7, atol=1e-12)
    np.testing.assert_array_equal(graph.diverged_step, eager.diverged_step)


def test_compiled_has_no_host_sync_per_step():
    syncs = _host_syncs([dataclasses.replace(c, engine="compiled")
                         for c in _cfgs("cuda", n=64, dtype="float32", steps=256)])
    assert len(syncs) < 256 // 4, syncs[:5]


def test_compiled_groups_sized_from_free_memory_fit():
    from gradsweep.engine.device import device_bytes_per_run

    cfgs = [dataclasses.replace(c, engine="compiled") for c in _cfgs("cuda", n=256, dtype="float32", steps=80)]
    train_group(cfgs)  # compile
    assert _peak_bytes(cfgs) <= len(cfgs) * device_bytes_per_run(cfgs[0]) + 64 * 2**20


@pytest.mark.parametrize("model", [{"name": "cnn", "depth": 3, "width": 4, "norm": "batchnorm"},
                                   {"name": "resmlp", "depth": 3, "width": 16}])
def test_a_module_on_cuda_matches_cpu_in_float64(model):
    """A module-built net (vmap over functional_call, hooks, BatchNorm's buffers) on the GPU and on the CPU."""
    def cfgs(device):
        return [make_cfg(model=model, data={"name": "digits", "n_samples": 128}, device=device,
                         optim={"lr": 0.01 * (1 + r)}, train={"steps": 20, "seed": r, "dtype": "float64"})
                for r in range(4)]

    gpu, cpu = train_group(cfgs("cuda")), train_group(cfgs("cpu"))
    assert gpu.device.startswith("cuda")
    np.testing.assert_allclose(gpu.loss, cpu.loss, rtol=1e-9)
    np.testing.assert_allclose(gpu.final_loss, cpu.final_loss, rtol=1e-9)
    np.testing.assert_allclose(gpu.layer, cpu.layer, rtol=1e-7, atol=1e-12)


DROPPED = '''
from torch import nn


class Dropped(nn.Module):
    def __init__(self, in_dim, out_dim, width=16, p=0.3):
        super().__init__()
        self.a, self.drop, self.b = nn.Linear(in_dim, width), nn.Dropout(p), nn.Linear(width, out_dim)

    def forward(self, x):
        return self.b(self.drop(self.a(x).relu()))
'''


def dropout_runs_are_their_own(device: str, tmp_path, monkeypatch) -> None:
    """Dropout trains run by run (vmap refuses its randomness): each run's numbers equal plain PyTorch's on
    ``device`` (the module built under its seed, float64, SGD, full batch) and so do not depend on its group."""
    import torch.nn.functional as F

    from gradsweep.engine.data import load_data

    (tmp_path / "droppednets.py").write_text(DROPPED)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import droppednets

    def cfg(seed: int):
        return make_cfg(model={"name": "custom", "net": {"_target_": "droppednets.Dropped"}}, device=device,
                        init={"name": "default", "scheme": "default"}, optim={"lr": 0.05},
                        train={"steps": 12, "seed": seed, "dtype": "float64"})

    group = train_group([cfg(0), cfg(1), cfg(2)], progress=False)
    assert group.device.startswith(device)
    for r in range(3):
        alone = train_group([cfg(r)], progress=False)
        np.testing.assert_allclose(group.loss[:, r], alone.loss[:, 0], rtol=1e-12)
        run = cfg(r)
        torch.manual_seed(r)
        net = droppednets.Dropped(run.data.in_dim, run.data.out_dim).double().to(device)
        data = load_data(run.data)
        x, y = data.x.double().to(device), data.y.double().to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        losses = []
        for _ in range(12):
            opt.zero_grad()
            loss = F.mse_loss(net(x), y)
            loss.backward()
            losses.append(loss.item())
            opt.step()
        np.testing.assert_allclose(group.loss[:, r], np.array(losses)[group.steps], rtol=1e-9)


def test_dropout_run_by_run_on_cuda_draws_from_each_runs_own_stream(tmp_path, monkeypatch):
    dropout_runs_are_their_own("cuda", tmp_path, monkeypatch)


def test_sharpness_on_cuda_matches_cpu_in_float64_and_syncs_per_iteration_not_per_step():
    """The fused Lanczos on CUDA (the eager double-backward product) gives the CPU's values; through 256 steps
    it syncs only in its own measurements (step 0 and the end), a few times per iteration."""
    from gradsweep.engine.train import initial_sharpness

    gpu, cpu = initial_sharpness(_cfgs("cuda", n=16)), initial_sharpness(_cfgs("cpu", n=16))
    assert gpu.converged.all() and cpu.converged.all()
    np.testing.assert_allclose(gpu.value.cpu().numpy(), cpu.value.numpy(), rtol=1e-8)
    # at most 20 products per measurement, two measurements: <= 160 syncs at 4 per iteration, under one per step
    cfgs = [dataclasses.replace(c, stats=dataclasses.replace(c.stats, sharpness_max_iter=20))
            for c in _cfgs("cuda", n=64, dtype="float32", steps=256)]
    train_group(cfgs)
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trace = train_group(cfgs)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert np.isfinite(trace.sharpness[0]).all()
    assert len(syncs) - len(_host_syncs(cfgs)) <= 4 * 2 * 20, [str(w.message) for w in syncs[:5]]
