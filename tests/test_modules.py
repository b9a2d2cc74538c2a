"""Module-built nets (gradsweep.engine.nets, gradsweep.engine.module_runs) against plain PyTorch: a user's residual MLP
with LayerNorm and a CNN, trained by an nn.Module and torch.optim in float64, step by step."""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import scaled
from torch import nn

from gradsweep.config.sections import ConfigError, build_run_cfg
from gradsweep.engine.data import load_data
from gradsweep.engine.train import train_group
from gradsweep.results.schema import LAYER_STATS
from gradsweep.results.tables import build_tables

NETS = textwrap.dedent('''
    import torch
    from torch import nn


    class ResMLP(nn.Module):
        def __init__(self, in_dim, out_dim, depth=3, width=12):
            super().__init__()
            self.inp = nn.Linear(in_dim, width)
            self.blocks = nn.ModuleList([nn.ModuleDict({"norm": nn.LayerNorm(width), "fc1": nn.Linear(width, width),
                                                        "fc2": nn.Linear(width, width)}) for _ in range(depth)])
            self.head = nn.Linear(width, out_dim)

        def forward(self, x):
            h = self.inp(x)
            for b in self.blocks:
                h = h + b["fc2"](torch.tanh(b["fc1"](b["norm"](h))))
            return self.head(h)


    class CNN(nn.Module):
        def __init__(self, out_dim, channels=3, depth=2):
            super().__init__()
            self.convs = nn.Sequential(*[m for i in range(depth) for m in
                                         (nn.Conv2d(1 if i == 0 else channels, channels, 3, padding=1), nn.ReLU())])
            self.head = nn.Linear(channels * 64, out_dim)

        def forward(self, x):
            return self.head(self.convs(x.view(-1, 1, 8, 8)).flatten(1))


    class Dropped(nn.Module):
        def __init__(self, in_dim, out_dim):
            super().__init__()
            self.a, self.drop, self.b = nn.Linear(in_dim, 8), nn.Dropout(0.2), nn.Linear(8, out_dim)

        def forward(self, x):
            return self.b(self.drop(torch.relu(self.a(x))))


    class BatchNormed(nn.Module):
        def __init__(self, in_dim, out_dim, width=8):
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(in_dim, width), nn.BatchNorm1d(width), nn.Linear(width, out_dim)

        def forward(self, x):
            return self.b(torch.relu(self.bn(self.a(x))))


    def mlp(in_dim, out_dim, depth=3, width=10):
        dims = [in_dim] + [width] * depth
        layers = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.Tanh()]
        return nn.Sequential(*layers, nn.Linear(width, out_dim))


    class Scaled(nn.Module):
        def __init__(self, in_dim, out_dim, scale=1.0):
            super().__init__()
            self.fc, self.scale = nn.Linear(in_dim, out_dim), scale

        def forward(self, x):
            return self.fc(x) * self.scale


    class NoWeights(nn.Module):
        def forward(self, x):
            return x[:, :1] * 2
''')


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """The module file ``usernets.py`` in a fresh working directory on the path."""
    (tmp_path / "usernets.py").write_text(NETS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("usernets", None)
    yield
    sys.modules.pop("usernets", None)


def cfg(net: dict, data: str = "regression", **sections) -> object:
    values = {"model": {"name": "custom", "net": net}, "train": {"steps": 6, "dtype": "float64"},
              "data": {"name": data, **({"n_samples": 64} if data == "digits" else {})}}
    for key, value in sections.items():
        values.setdefault(key, {}).update(value)
    return build_run_cfg(values)


def reference(run, factory):
    """Plain PyTorch: the module built under the run's seed, each Linear/Conv re-initialised in module order, float64,
    torch.optim.SGD; per step the loss and, per recorded layer (by dotted name), |dL/dh| and |dL/dW|. Random
    operations (dropout) draw from the global stream the seed started."""
    torch.manual_seed(run.train.seed)
    net = factory()
    if any(nn.parameter.is_lazy(p) for p in net.parameters()):  # materialised by a batch of zeros, in eval mode
        net.eval()
        with torch.no_grad():
            net(torch.zeros(2, run.data.in_dim))
        net.train()
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.requires_grad:  # a frozen layer keeps its weights
            with torch.no_grad():
                if run.init.scheme == "xavier":
                    nn.init.xavier_uniform_(m.weight, gain=run.init.gain)
                elif run.init.scheme == "kaiming":
                    nn.init.kaiming_uniform_(m.weight, a=run.init.a, mode=run.init.mode,
                                             nonlinearity=run.init.nonlinearity)
    net = net.double()
    data = load_data(run.data)
    x = data.x.double()
    y = data.y.double() if data.y.is_floating_point() else data.y
    opt = torch.optim.SGD(net.parameters(), lr=run.optim.lr)
    recorded = {name: m for name, m in net.named_modules()
                if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.BatchNorm1d)) and m.weight.requires_grad}
    outs = {}
    def keep(name, output):
        if output.requires_grad:
            output.retain_grad()
        outs[name] = output

    for name, m in recorded.items():
        m.register_forward_hook(lambda mod, i, o, name=name: keep(name, o))
    record = []
    for _ in range(run.train.steps):
        opt.zero_grad()
        out = net(x)
        loss = F.mse_loss(out, y) if y.is_floating_point() else F.cross_entropy(out, y)
        loss.backward()
        record.append({"loss": loss.item(), **{
            name: (outs[name].grad.norm().item(), m.weight.grad.norm().item()) for name, m in recorded.items()}})
        opt.step()
    net.eval()  # gradsweep's final loss: eval mode (BatchNorm's running statistics)
    with torch.no_grad():
        out = net(x)
        final = (F.mse_loss(out, y) if y.is_floating_point() else F.cross_entropy(out, y)).item()
    return record, final


@pytest.mark.parametrize("which", ["resmlp", "cnn", "batchnorm"])
def test_float64_equals_plain_pytorch(nets, which):
    import usernets

    if which == "resmlp":
        runs = [cfg({"_target_": "usernets.ResMLP", "depth": d}, init={"name": i, "scheme": i}, optim={"lr": lr})
                for d in (2, 3) for i in ("xavier", "kaiming") for lr in (0.003, 0.01)]
    elif which == "cnn":
        runs = [cfg({"_target_": "usernets.CNN", "channels": c}, "digits", init={"name": i, "scheme": i},
                    optim={"lr": lr}) for c in (2, 3) for i in ("xavier", "kaiming") for lr in (0.05, 0.2)]
    else:  # BatchNorm fuses too: each run's batch statistics and running buffers are its own
        runs = [cfg({"_target_": "usernets.BatchNormed", "width": w}, train={"seed": s}, optim={"lr": 0.05})
                for w in (4, 8) for s in range(3)]
    by_arch: dict[str, list] = {}
    for r in runs:
        by_arch.setdefault(str(r.model.net), []).append(r)
    for group in by_arch.values():
        trace = train_group(group, progress=False)
        runs_t, steps = build_tables(group, trace)
        for r, run in enumerate(group):
            net = run.model.net
            args = {k: v for k, v in net.items() if k != "_target_"}
            factory = {"resmlp": functools.partial(usernets.ResMLP, 1, 1, **args),
                       "cnn": functools.partial(usernets.CNN, 10, **args),
                       "batchnorm": functools.partial(usernets.BatchNormed, 1, 1, **args)}[which]
            record, final = reference(run, factory)
            mine = steps[steps.run_id == runs_t.run_id[r]]
            names = list(record[0])[1:]
            assert sorted(set(mine.layer_name)) == sorted(names)  # every layer, by its dotted name
            for t, rec in enumerate(record):
                at = mine[mine.step == t].set_index("layer_name")
                assert at.loss.iloc[0] == pytest.approx(rec["loss"], rel=1e-9)
                for name in names:
                    h, w = rec[name]
                    assert at.loc[name, "hgrad_norm"] == pytest.approx(h, rel=1e-9), (t, name)
                    assert at.loc[name, "wgrad_norm"] == pytest.approx(w, rel=1e-9), (t, name)
            assert np.isfinite(final) and runs_t.final_loss[r] == pytest.approx(final, rel=1e-9)
            assert runs_t.pred_note[r] == "custom model: no mean-field prediction"


def test_signal_ratio_is_first_over_last_weight_layer(nets):
    run = cfg({"_target_": "usernets.ResMLP", "depth": 2})
    trace = train_group([run], progress=False)
    runs, steps = build_tables([run], trace)
    at0 = steps[steps.step == 0].set_index("layer_name")
    assert list(at0.index[:2]) == ["inp", "blocks.0.norm"]  # forward order, norms included
    expected = np.log10(at0.loc["inp", "hgrad_norm"] / at0.loc["head", "hgrad_norm"])
    assert runs.grad_ratio_log10[0] == pytest.approx(expected, rel=1e-12)
    assert set(at0.kind) == {"linear", "norm"}


def test_fused_group_equals_runs_alone_and_run_by_run(nets, caplog):
    runs = [cfg({"_target_": "usernets.ResMLP"}, train={"seed": s}, optim={"lr": 0.05}) for s in range(3)]
    with caplog.at_level("INFO", logger="gradsweep.engine.module_runs"):
        together = build_tables(runs, train_group(runs, progress=False))[1]
    assert not any("one by one" in r.message for r in caplog.records)  # LayerNorm and Linear fuse
    for run in runs:
        alone = build_tables([run], train_group([run], progress=False))[1]
        mine = together[together.run_id == alone.run_id[0]].reset_index(drop=True)
        for col in ("loss", *LAYER_STATS):
            np.testing.assert_allclose(mine[col].to_numpy(float), alone[col].to_numpy(float), rtol=1e-12, equal_nan=True)
    # a module vmap cannot take (dropout's randomness) trains run by run, with one log line saying why
    drop = [cfg({"_target_": "usernets.Dropped"}, train={"seed": s}) for s in range(2)]
    with caplog.at_level("INFO", logger="gradsweep.engine.module_runs"):
        steps = build_tables(drop, train_group(drop, progress=False))[1]
    assert any("one by one" in r.message and "usernets.Dropped" in r.message for r in caplog.records)
    assert steps.hgrad_norm.notna().all() and set(steps.layer_name) == {"a", "b"}


def test_plain_sequential_mlp_trains_on_the_builtin_engine(nets):
    # run 0's init draws nothing: the others' draws (kaiming, xavier) are taken without building their modules
    runs = [cfg({"_target_": "usernets.mlp"}, train={"seed": s}, init={"name": i, "scheme": i})
            for s, i in enumerate(("default", "kaiming", "xavier"))]
    trace = train_group(runs, progress=False)
    assert trace.engine in ("eager", "compiled")
    runs_t, steps = build_tables(runs, trace)
    assert list(steps[(steps.step == 0) & (steps.run_id == runs_t.run_id[0])].layer_name) == ["0", "2", "4", "6"]
    import usernets

    torch.manual_seed(12345)  # the global RNG's state must not matter
    for r in range(3):  # run 0 from its module, runs 1 and 2 drawn without building them: each as plain PyTorch
        record, final = reference(runs[r], lambda: usernets.mlp(1, 1))
        assert runs_t.final_loss[r] == pytest.approx(final, rel=1e-9)
        at0 = steps[(steps.step == 0) & (steps.run_id == runs_t.run_id[r])].set_index("layer_name")
        assert at0.loc["0", "hgrad_norm"] == pytest.approx(record[0]["0"][0], rel=1e-9)


@pytest.mark.parametrize("net, message", [
    ({"_target_": "nosuchmodule.Net"}, "model.net._target_='nosuchmodule.Net' does not import: ModuleNotFoundError"),
    ({"_target_": "usernets.ResMLP", "depht": 3}, "model.net.depht is not an argument of usernets.ResMLP; valid "
                                                   "arguments: in_dim, out_dim, depth, width"),
    ({"_target_": "usernets.NoWeights"}, "has no trainable nn.Linear or nn.Conv layer"),
    ({"_target_": "usernets.CNN"}, "model.net: usernets.CNN fails on a batch of the data's inputs (2, 1)"),
    ({"_target_": "usernets.mlp", "out_dim": 3}, "model.net: usernets.mlp returns (2, 3) for inputs (2, 1); the data "
                                                  "needs (2, 1)"),
])
def test_bad_module_is_one_line(nets, net, message):
    from gradsweep.engine.nets import describe

    run = cfg(net)
    with pytest.raises(ConfigError) as e:
        describe(run.model, run.data.in_dim, run.data.out_dim)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_data_dims_are_passed_and_interpolated(nets):
    from gradsweep.sweep.preflight import compose_values

    values = compose_values(["model=custom", "model.net._target_=usernets.mlp", "model.net.width=${data.out_dim}",
                             "data=digits", "model.net.depth=2"])
    assert values["data"]["in_dim"] == 64 and values["model"]["net"]["width"] == 10
    run = build_run_cfg(values)
    trace = train_group([run], progress=False)
    assert trace.in_dim == 64 and trace.out_dim == 10


@pytest.mark.slow
@pytest.mark.parametrize("which", ["resmlp", "cnn"])
def test_a_sweep_of_a_users_module_from_the_command_line(tmp_path, which):
    (tmp_path / "usernets.py").write_text(NETS)
    sweep = tmp_path / "sweep"
    arg, data = (("model.net.depth=1,3", "data=regression") if which == "resmlp" else
                 ("model.net.channels=2,4", "data=digits"))
    target = "usernets.ResMLP" if which == "resmlp" else "usernets.CNN"
    command = [sys.executable, "-m", "gradsweep", "-m", "model=custom", f"model.net._target_={target}", arg, data,
               "init=xavier,kaiming", "optim.lr=0.003,0.03", "train.steps=20", "quiet=true", f"hydra.sweep.dir={sweep}"]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=scaled(300))
    assert run.returncode == 0, run.stderr[-3000:]
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=scaled(300))
    assert again.returncode == 0 and "8 of 8 runs already complete" in again.stdout + again.stderr  # resumed
    from gradsweep import load_sweep

    runs, steps = load_sweep(sweep)
    assert len(runs) == 8 and runs["final_loss"].notna().all()
    sys.path.insert(0, str(tmp_path))
    try:
        import usernets

        for _, row in runs.iterrows():
            if which == "resmlp":
                net = usernets.ResMLP(1, 1, depth=int(row["model.net.depth"]))
            else:
                net = usernets.CNN(10, channels=int(row["model.net.channels"]))
            want = {n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, nn.LayerNorm))}
            assert set(steps[steps.run_id == row.run_id].layer_name) == want  # every layer, by name
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("usernets", None)
    report = subprocess.run([sys.executable, "-m", "gradsweep.report", str(sweep)], cwd=tmp_path, capture_output=True,
                            text=True, timeout=scaled(300))
    assert report.returncode == 0, report.stderr[-3000:]
    assert (sweep / "report" / "flow_maps.png").stat().st_size > 10_000
    bad = subprocess.run([sys.executable, "-m", "gradsweep", "-m", "model=custom", f"model.net._target_={target}",
                          "model.net.nope=1,2", data, f"hydra.sweep.dir={tmp_path / 'bad'}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=scaled(300))
    assert bad.returncode == 2 and not (tmp_path / "bad").exists()
    assert bad.stderr.strip().splitlines()[-1].startswith(f"gradsweep: error: model.net.nope is not an argument of {target}")


FUSE = textwrap.dedent('''
    import torch
    from torch import nn

    MIDDLE = {
        "LayerNorm": lambda: nn.LayerNorm(16), "BatchNorm1d": lambda: nn.BatchNorm1d(16),
        "GroupNorm": lambda: nn.GroupNorm(4, 16), "PReLU": nn.PReLU, "GELU": nn.GELU,
        "ReLU(inplace)": lambda: nn.ReLU(inplace=True), "Dropout": lambda: nn.Dropout(0.1),
    }


    class Middle(nn.Module):
        def __init__(self, in_dim, out_dim, kind):
            super().__init__()
            self.kind, self.a, self.b = kind, nn.Linear(in_dim, 16), nn.Linear(16, out_dim)
            self.mid = MIDDLE[kind]() if kind in MIDDLE else nn.GRU(4, 4, batch_first=True) if kind == "GRU" else (
                nn.MultiheadAttention(16, 2, batch_first=True) if kind == "MultiheadAttention" else nn.Identity())

        def forward(self, x):
            h = self.a(x)
            if self.kind == "MultiheadAttention":
                s = h.unsqueeze(1)
                h = self.mid(s, s, s, need_weights=False)[0].squeeze(1)
            elif self.kind == "GRU":
                h = self.mid(h.view(-1, 4, 4))[0].reshape(-1, 16)
            elif self.kind == "branch" and h.mean() > 0:  # data-dependent control flow
                h = 2 * h
            else:
                h = self.mid(h)
            return self.b(torch.relu(h))


    class Image(nn.Module):
        def __init__(self, in_dim, out_dim, kind):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3, padding=1)
            self.mid = {"Conv2d": nn.Identity(), "BatchNorm2d": nn.BatchNorm2d(4), "MaxPool2d": nn.MaxPool2d(2),
                        "AdaptiveAvgPool2d": nn.AdaptiveAvgPool2d(4)}[kind]
            self.head = nn.Linear(4 * (64 if kind in ("Conv2d", "BatchNorm2d") else 16), out_dim)

        def forward(self, x):
            return self.head(self.mid(self.c(x.view(-1, 1, 8, 8))).flatten(1))
''')


@pytest.mark.parametrize("target, kind, fused", [
    *[("Middle", k, True) for k in ("LayerNorm", "BatchNorm1d", "GroupNorm", "PReLU", "GELU", "ReLU(inplace)",
                                    "MultiheadAttention")],
    *[("Middle", k, False) for k in ("Dropout", "branch", "GRU")],
    *[("Image", k, True) for k in ("Conv2d", "BatchNorm2d", "MaxPool2d", "AdaptiveAvgPool2d")],
])
def test_which_layers_fuse(tmp_path, monkeypatch, caplog, target, kind, fused):
    """The table in docs/reference.md: what trains through vmap, and what run by run (with one log line)."""
    (tmp_path / "fusenets.py").write_text(FUSE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("fusenets", None)
    data = "digits" if target == "Image" else "regression"
    runs = [cfg({"_target_": f"fusenets.{target}", "kind": kind}, data, train={"seed": s, "steps": 2,
                                                                             "dtype": "float32"}) for s in range(2)]
    with caplog.at_level("INFO", logger="gradsweep.engine.module_runs"):
        trace = train_group(runs, progress=False)
    alone = [r.message for r in caplog.records if "one by one" in r.message]
    assert (not alone) == fused, alone
    called = [k for k, la in enumerate(trace.layers) if la.path != "mid.out_proj"]  # MHA uses its weight, not its call
    summary = build_tables(runs, trace)[0]
    assert np.isfinite(summary.grad_ratio_log10).all() and set(summary.verdict) <= {"healthy", "stalled"}
    assert np.isfinite(trace.final_loss).all()
    assert np.isfinite(trace.layer[:, :, called, LAYER_STATS.index("hgrad_norm")]).all()
    assert np.isfinite(trace.layer[..., LAYER_STATS.index("wgrad_norm")]).all()
    sys.modules.pop("fusenets", None)


def test_the_tuner_finds_a_stable_lr_for_a_users_module(nets, tmp_path):
    import usernets

    from gradsweep.tune import compose, tune_study

    values, base, tune = compose(["model=custom", "model.net._target_=usernets.ResMLP", "model.net.depth=3",
                                  "train.steps=60", "tune.n_trials=12", "tune.batch_size=12", "quiet=true",
                                  f"tune.out_dir={tmp_path / 'tuned'}"])
    best = tune_study(values, base, tune, quiet=True)
    assert best["best"] is not None, best
    lr = best["best"]["lr"]
    # the module at that lr, trained by plain PyTorch in float32: stable, and it learned
    run = build_run_cfg({**values, "optim": {**values["optim"], "lr": lr}})
    record, final = reference(run, functools.partial(usernets.ResMLP, 1, 1, depth=3))
    assert np.isfinite(final) and final < 0.5 * record[0]["loss"]
    assert final == pytest.approx(best["best"]["loss"], rel=0.05)


@pytest.mark.parametrize("norm", ["none", "batchnorm", "layernorm"])
@pytest.mark.parametrize("residual", [False, True])
def test_builtin_cnn_and_resmlp(norm, residual):
    from gradsweep.engine.nets import ConvNet, ResMLP

    cnn = build_run_cfg({"model": {"name": "cnn", "depth": 3, "width": 4, "norm": norm, "residual": residual},
                         "data": {"name": "digits", "n_samples": 64}, "train": {"steps": 3}})
    res = build_run_cfg({"model": {"name": "resmlp", "depth": 2, "width": 8, "norm": norm, "residual": residual},
                         "train": {"steps": 3}})
    for run, cls in ((cnn, ConvNet), (res, ResMLP)):
        runs, steps = build_tables([run], train_group([run], progress=False))
        names = set(steps.layer_name)
        net = cls(run.data.in_dim, run.data.out_dim, depth=run.model.depth, width=run.model.width, norm=norm,
                  residual=residual)
        want = {n for n, m in net.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))} | {
            n for n, m in net.named_modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d,
                                                                nn.BatchNorm2d))}
        assert names == want and np.isfinite(runs.final_loss[0])
        assert runs.pred_note[0] == f"{run.model.name} model: no mean-field prediction"
    assert {"convs.0", "convs.2", "head"} <= set(build_tables([cnn], train_group([cnn], progress=False))[1].layer_name)
    for features in (3, 1, 4):  # not a square, and squares too small for a 3x3 kernel
        with pytest.raises(ConfigError, match=f"model=cnn needs square one-channel images of at least 3x3 \\(its 3x3 "
                                              f"kernels\\): data has {features} features"):
            ConvNet(features, 1)


ODD = textwrap.dedent('''
    import torch
    from torch import nn


    class Dropper(nn.Module):
        def __init__(self, in_dim, out_dim, p=0.3):
            super().__init__()
            self.a, self.drop, self.b = nn.Linear(in_dim, 16), nn.Dropout(p), nn.Linear(16, out_dim)

        def forward(self, x):
            return self.b(self.drop(torch.tanh(self.a(x))))


    class Inplace(nn.Module):
        def __init__(self, in_dim, out_dim, inplace=True):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(in_dim, 8), nn.ReLU(inplace=inplace), nn.Linear(8, out_dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))


    class Frozen(Inplace):
        def __init__(self, in_dim, out_dim):
            super().__init__(in_dim, out_dim, inplace=False)
            self.fc1.requires_grad_(False)


    class Tied(nn.Module):
        def __init__(self, in_dim, out_dim):
            super().__init__()
            self.a, self.mid1, self.mid2, self.b = (nn.Linear(in_dim, 8), nn.Linear(8, 8), nn.Linear(8, 8),
                                                    nn.Linear(8, out_dim))
            self.mid2.weight = self.mid1.weight

        def forward(self, x):
            return self.b(self.mid2(self.mid1(self.a(x))))


    def normed(in_dim, out_dim):
        return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(in_dim, 8)), nn.Tanh(),
                             nn.Linear(8, out_dim))


    class Lazy(nn.Module):
        def __init__(self, out_dim):
            super().__init__()
            self.a, self.b = nn.LazyLinear(8), nn.Linear(8, out_dim)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))


    class Branch(nn.Module):
        """Takes layer a or b by the sign of a parameter: a different layer per seed, and no vmap."""
        def __init__(self, in_dim, out_dim):
            super().__init__()
            self.gate = nn.Parameter(torch.randn(()))
            self.a, self.b, self.head = nn.Linear(in_dim, 8), nn.Linear(in_dim, 8), nn.Linear(8, out_dim)

        def forward(self, x):
            return self.head(torch.tanh(self.a(x) if self.gate > 0 else self.b(x)))


    class SeqFirst(nn.Module):
        """A layer whose output has the batch on its second axis (torch's sequence-first layout)."""
        def __init__(self, in_dim, out_dim):
            super().__init__()
            self.a, self.mid, self.b = nn.Linear(in_dim, 8), nn.Linear(8, 8), nn.Linear(8, out_dim)

        def forward(self, x):
            return self.b(torch.tanh(self.mid(torch.tanh(self.a(x)).unsqueeze(0))[0]))


    class Factory:
        @classmethod
        def small(cls, in_dim, out_dim, width=6):
            return nn.Sequential(nn.Linear(in_dim, width), nn.Tanh(), nn.Linear(width, out_dim))
''')


@pytest.fixture
def odd(tmp_path, monkeypatch):
    (tmp_path / "oddnets.py").write_text(ODD)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("oddnets", None)
    yield __import__("oddnets")
    sys.modules.pop("oddnets", None)


def _equal_to_reference(runs, factory):
    runs_t, steps = build_tables(runs, train_group(runs, progress=False))
    for r, run in enumerate(runs):
        record, final = reference(run, factory)
        mine = steps[steps.run_id == runs_t.run_id[r]]
        for t, rec in enumerate(record):
            at = mine[mine.step == t].set_index("layer_name")
            assert at.loss.iloc[0] == pytest.approx(rec["loss"], rel=1e-9), (r, t)
            for name, (h, w) in list(rec.items())[1:]:
                name = name or "(module)"  # the module itself
                assert at.loc[name, "hgrad_norm"] == pytest.approx(h, rel=1e-9), (r, t, name)
                assert at.loc[name, "wgrad_norm"] == pytest.approx(w, rel=1e-9), (r, t, name)
        assert runs_t.final_loss[r] == pytest.approx(final, rel=1e-9)
    return runs_t, steps


def test_dropout_draws_each_runs_own_stream_as_its_script_would(odd):
    runs = [cfg({"_target_": "oddnets.Dropper"}, train={"seed": s}) for s in range(3)]
    _, steps = _equal_to_reference(runs, functools.partial(odd.Dropper, 1, 1))
    alone = build_tables(runs[1:2], train_group(runs[1:2], progress=False))[1]  # whatever its group
    mine = steps[steps.run_id == alone.run_id[0]].reset_index(drop=True)
    np.testing.assert_array_equal(mine.hgrad_norm.to_numpy(), alone.hgrad_norm.to_numpy())


def test_odd_modules_train_as_plain_pytorch(odd):
    _equal_to_reference([cfg({"_target_": "oddnets.Frozen"}, train={"seed": s}) for s in range(2)],
                        functools.partial(odd.Frozen, 1, 1))  # the frozen layer is neither trained nor recorded
    _equal_to_reference([cfg({"_target_": "oddnets.Lazy"}, train={"seed": s}) for s in range(2)],
                        functools.partial(odd.Lazy, 1))
    _, steps = _equal_to_reference([cfg({"_target_": "oddnets.SeqFirst"}, train={"seed": s}) for s in range(2)],
                                   functools.partial(odd.SeqFirst, 1, 1))
    assert set(steps.layer_name) == {"a", "mid", "b"}
    _equal_to_reference([cfg({"_target_": "oddnets.Factory.small"})], functools.partial(odd.Factory.small, 1, 1))
    _, steps = _equal_to_reference([cfg({"_target_": "torch.nn.Linear", "in_features": 1, "out_features": 1})],
                                   functools.partial(nn.Linear, 1, 1))
    assert set(steps.layer_name) == {"(module)"}
    inplace = [cfg({"_target_": "oddnets.Inplace", "inplace": v}) for v in (True, False)]
    out_rms = [build_tables([r], train_group([r], progress=False))[1].out_rms.to_numpy() for r in inplace]
    np.testing.assert_allclose(out_rms[0], out_rms[1], rtol=1e-12)  # taken before the in-place ReLU overwrites it


def test_a_layer_a_run_does_not_call_is_not_recorded(odd):
    runs = [cfg({"_target_": "oddnets.Branch"}, train={"seed": s}) for s in (0, 1, 4, 5)]  # gates +, +, -, -
    runs_t, steps = build_tables(runs, train_group(runs, progress=False))
    at0 = steps[steps.step == 0]
    taken = {rid: set(g.layer_name[g.hgrad_norm.notna()]) for rid, g in at0.groupby("run_id")}
    assert {frozenset(t) for t in taken.values()} == {frozenset({"a", "head"}), frozenset({"b", "head"})}
    assert runs_t.final_loss.notna().all()
    for rid, g in at0.groupby("run_id"):  # the ratio: the layer this run called over the readout
        h = g.set_index("layer_name").hgrad_norm
        called = "a" if np.isfinite(h["a"]) else "b"
        ratio = runs_t.set_index("run_id").grad_ratio_log10[rid]
        assert ratio == pytest.approx(np.log10(h[called] / h["head"]), rel=1e-12)


@pytest.mark.parametrize("target, message", [
    ("oddnets.Tied", "model.net: oddnets.Tied shares one parameter between 'mid1.weight' and 'mid2.weight'"),
    ("oddnets.normed", "model.net: oddnets.normed's layer '0' has a computed weight"),
])
def test_shared_or_computed_weights_are_one_line(odd, target, message):
    from gradsweep.engine.nets import describe

    run = cfg({"_target_": target})
    with pytest.raises(ConfigError) as e:
        describe(run.model, run.data.in_dim, run.data.out_dim)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_preflight_checks_the_module_on_every_data_and_reads_interpolations(nets):
    from gradsweep.sweep.preflight import check_overrides

    check_overrides(["model=custom", "model.net._target_=usernets.mlp", "model.net.width=${data.out_dim}", "data=digits"])
    with pytest.raises(ConfigError, match=r"usernets.CNN fails on a batch of the data's inputs \(2, 1\)"):
        check_overrides(["model=custom", "model.net._target_=usernets.CNN", "data=digits,regression"])


ONE_SAMPLE = ("train.batch_size=1 is not valid with usernets.BatchNormed, which fails on a batch of one sample "
              "(ValueError: Expected more than 1 value per channel when training")


def test_a_batch_of_one_sample_is_checked_where_asked_for(nets):
    """BatchNorm needs two samples a batch when training: train.batch_size=1 with it is one line before a run trains
    (describe's batches of 2 and 3 cannot see it), at pre-flight for a swept value too, and where a group trains;
    a module that takes one sample passes."""
    from gradsweep.sweep.preflight import check_overrides

    check_overrides(["model=custom", "model.net._target_=usernets.ResMLP", "train.batch_size=1"])
    check_overrides(["model=custom", "model.net._target_=usernets.BatchNormed", "train.batch_size=2"])
    for sweep in ("train.batch_size=1", "train.batch_size=4,1"):
        with pytest.raises(ConfigError) as e:
            check_overrides(["model=custom", "model.net._target_=usernets.BatchNormed", sweep])
        assert str(e.value).startswith(ONE_SAMPLE) and str(e.value).endswith("; it must be null or >= 2")
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"^train.batch_size=1 is not valid with usernets.BatchNormed"):
        train_group([cfg({"_target_": "usernets.BatchNormed"}, train={"batch_size": 1})], progress=False)
    with pytest.raises(ConfigError, match=r"^data.n_samples=1 is not valid; it must be an integer >= 2"):
        build_run_cfg({"model": {"name": "custom", "net": {"_target_": "usernets.BatchNormed"}},
                       "data": {"n_samples": 1}, "train": {"steps": 2}})


@pytest.mark.slow
def test_one_sample_in_any_job_of_a_sweep_is_one_line(tmp_path):
    """Pre-flight checks each swept value with the first job's others; the one combination that fails (BatchNorm at
    batch size 1, neither first) is caught where the fused launcher builds every job, before any trains."""
    (tmp_path / "usernets.py").write_text(NETS)
    bad = subprocess.run([sys.executable, "-m", "gradsweep", "-m", "model=custom",
                          "model.net._target_=usernets.ResMLP,usernets.BatchNormed", "train.batch_size=4,1",
                          "train.steps=5", f"hydra.sweep.dir={tmp_path / 'bad'}"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=scaled(300))
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines()[-1].startswith(f"gradsweep: error: {ONE_SAMPLE}")
    assert not list((tmp_path / "bad").rglob("*.parquet"))


def test_argument_columns_a_report_can_read(nets, tmp_path):
    """A list argument is a text column; an argument swept over 0 and 0.5 (int and float) reads as one float column."""
    from gradsweep import load_sweep
    from gradsweep.config.identity import flatten
    from gradsweep.results.store import write_tables

    assert flatten(cfg({"_target_": "usernets.ResMLP", "width": [8, 16]}))["model.net.width"] == "[8, 16]"
    for i, scale in enumerate((0, 0.5)):  # each group's table types the column by its own value
        run = cfg({"_target_": "usernets.Scaled", "scale": scale}, train={"steps": 1})
        write_tables(tmp_path / str(i), *build_tables([run], train_group([run], progress=False)))
    runs, _ = load_sweep(tmp_path)
    assert runs["model.net.scale"].tolist() == [0.0, 0.5]
