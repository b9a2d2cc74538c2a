"""The command line: bad input refused in one line before anything is written, and real Hydra runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import scaled

from gradsweep import load_sweep
from gradsweep.report.layout import aggregate, infer_layout
from gradsweep.results.verdicts import VERDICTS
from gradsweep.sweep.cli import main

REPO = Path(__file__).resolve().parent.parent

BAD = [
    (["model.activation=swish"], "model.activation='swish'", "sigmoid, tanh, relu"),
    (["init=he"], "init='he'", "default, kaiming, large"),
    (["optim.name=rmsprop"], "optim.name='rmsprop'", "sgd, adam"),
    (["optim=rmsprop"], "optim='rmsprop'", "adam, sgd"),
    (["model.depth=0"], "model.depth=0", ">= 1"),
    (["model.width=0"], "model.width=0", ">= 1"),
    (["optim.lr=0"], "optim.lr=0.0", "> 0"),
    (["optim.lr=-0.1"], "optim.lr=-0.1", "> 0"),
    (["train.clip_norm=-1"], "train.clip_norm=-1.0", ">= 0"),
    (["train.steps=0"], "train.steps=0", ">= 1"),
    (["model.depth=abc"], "model.depth='abc'", "an integer"),
    (["model.foo=1"], "model.foo", "model.depth, model.width"),
    (["+model.foo=1"], "model.foo", "model.depth, model.width"),
    (["data=mnist"], "data='mnist'", "regression, scaled"),
    (["train.dtype=float16"], "train.dtype='float16'", "float32, float64"),
    (["model.norm=groupnorm"], "model.norm='groupnorm'", "none, batchnorm, layernorm"),
    (["device=tpu"], "device='tpu'", "auto, cpu, cuda"),
    (["model.norm=batchnorm", "train.batch_size=1"], "train.batch_size=1", ">= 2"),
    (["-m", "model.depth=2,0"], "model.depth=0", ">= 1"),
    (["-m", "init=xavier,bogus"], "init='bogus'", "xavier"),
    (["-m", "optim.lr=range(-1,1,1)"], "optim.lr=-1", "> 0"),
]
if not torch.cuda.is_available():
    BAD.append((["device=cuda"], "device='cuda'", "auto, cpu"))


@pytest.mark.parametrize("argv,names,valid", BAD, ids=[" ".join(b[0]) for b in BAD])
def test_bad_input_is_one_line_and_writes_nothing(argv, names, valid, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main([*argv, "train.steps=2", "quiet=true"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("gradsweep: error: ") and names in err and valid in err
    assert list(tmp_path.iterdir()) == []


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "gradsweep", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=scaled(600))


@pytest.mark.slow  # subprocesses
def test_help_and_cfg(tmp_path):
    out = _run(["--help"], tmp_path)
    assert out.returncode == 0 and "init: default, kaiming, large, normal, orthogonal, uniform, xavier" in out.stdout
    out = _run(["--cfg", "job", "model.depth=3", "init=kaiming"], tmp_path)
    assert out.returncode == 0 and "depth: 3" in out.stdout and "scheme: kaiming" in out.stdout
    assert not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_the_readme_sweep_from_another_directory(tmp_path):
    # The exact command, run from a directory that is not the repository.
    out = _run(["-m", "model.depth=2,10,30", "init=xavier,kaiming"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    sweeps = list((tmp_path / "outputs" / "multirun").glob("*/*"))
    assert len(sweeps) == 1
    runs, steps = load_sweep(sweeps[0])
    assert len(runs) == 6
    assert sorted(zip(runs["model.depth"], runs["init"])) == sorted(
        (d, i) for d in (2, 10, 30) for i in ("xavier", "kaiming"))
    assert runs.job_num.tolist() == list(range(6))
    assert len(steps) == sum(500 * (d + 1) for d in runs["model.depth"])
    assert set(runs.verdict) <= set(VERDICTS)
    deep = runs[runs["model.depth"] == 30].set_index("init")
    # Kaiming gets the signal to layer 1 at step 0, but its ReLUs of one layer all die in the first update.
    assert deep.loc["xavier", "verdict"] == "vanishing" and deep.loc["kaiming", "init_verdict"] == "healthy"
    assert deep.loc["kaiming", "verdict"] == "dead" and deep.loc["kaiming", "dead_step"] == 1

    # The README's report step: no argument, the newest sweep in this directory.
    out = subprocess.run([sys.executable, "-m", "gradsweep.report", "--quiet"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=scaled(300))
    assert out.returncode == 0, out.stderr[-2000:]
    report = sweeps[0] / "report"
    for name in ("heatmap_ratio.png", "heatmap_loss.png", "heatmap_verdict.png", "flow_maps.png", "loss_curves.png",
                 "index.html", "summary.csv"):
        assert (report / name).stat().st_size > 0, name
    cells = aggregate(runs, infer_layout(runs), "grad_ratio_log10")
    assert infer_layout(runs).keys == ["model.depth", "init"] and len(cells) == 6


@pytest.mark.slow
def test_override_grammar_and_single_run(tmp_path):
    out = _run(["-m", "optim.lr=range(0.01,0.03,0.01)", "model.depth=choice(2,3)", "+tag=grammar", "train.steps=3",
                "quiet=true", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    runs, _ = load_sweep(tmp_path / "sweep")
    assert len(runs) == 4 and set(runs.tag) == {"grammar"}
    assert sorted(zip(runs["optim.lr"], runs["model.depth"])) == [(0.01, 2), (0.01, 3), (0.02, 2), (0.02, 3)]
    assert (tmp_path / "sweep" / "0" / ".hydra" / "config.yaml").exists()
    assert "group 1/2" in (tmp_path / "sweep" / "gradsweep.log").read_text()  # the fused sweep's one log

    out = _run(["train.steps=4", "quiet=true", f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    runs, steps = load_sweep(tmp_path / "one")
    assert len(runs) == 1 and pd.isna(runs.job_num[0]) and len(steps) == 4 * 11


@pytest.mark.slow
def test_same_seed_same_parquet(tmp_path):
    for name in ("a", "b"):
        out = _run(["train.steps=20", "model.activation=tanh", "quiet=true", f"hydra.run.dir={tmp_path / name}"], tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
    (ra, sa), (rb, sb) = load_sweep(tmp_path / "a"), load_sweep(tmp_path / "b")
    # The steps file holds no time at all: byte for byte the same; the runs file differs only in wall_s.
    assert (tmp_path / "a" / "steps.parquet").read_bytes() == (tmp_path / "b" / "steps.parquet").read_bytes()
    pd.testing.assert_frame_equal(sa, sb)
    pd.testing.assert_frame_equal(ra.drop(columns="wall_s"), rb.drop(columns="wall_s"))


@pytest.mark.slow
def test_a_bad_job_inside_a_basic_sweep_fails_it_in_one_line(tmp_path):
    # data.n_features=4 is fine with data=scaled (the first job) and not with data=regression (the second).
    # Pre-flight composes the job of each model and data preset a sweep names, so even Hydra's basic launcher, which
    # runs jobs one by one, writes nothing (the fused default checks every job first: tests/test_launcher.py).
    out = _run(["-m", "data=scaled,regression", "data.n_features=4", "train.steps=2", "quiet=true",
                "hydra/launcher=basic", "hydra/sweeper=basic", f"hydra.sweep.dir={tmp_path / 'sweep'}"], tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "gradsweep: error: data.n_features=4 is not valid; it must be 1 for data=regression (the article's data)"]
    assert not (tmp_path / "sweep").exists()


def test_help_lists_every_runner_group_and_its_options():
    """The help's group list is written out (Hydra's would list the tuner's own group too): it must stay true."""
    import yaml

    from gradsweep.sweep.preflight import GROUPS, group_options

    template = yaml.safe_load((REPO / "gradsweep" / "conf" / "hydra" / "help" / "gradsweep.yaml").read_text())["template"]
    for group in GROUPS:
        assert f"{group}: {', '.join(group_options(group))}" in template, group
    assert "tune:" not in template


EXIT_PROGRAM = """
import atexit, sys, threading, time
from pathlib import Path
from gradsweep.shutdown import run_and_exit
out = Path(sys.argv[1])
def main():
    atexit.register(lambda: (out / "atexit").write_text("ran"))
    threading.Thread(target=lambda: (time.sleep(0.3), (out / "thread").write_text("joined"))).start()
    sys.stdout.write("buffered, no newline")
    how = sys.argv[2]
    if how == "int":
        sys.exit(3)
    if how == "str":
        sys.exit("a message")
    if how == "raise":
        raise ValueError("boom")
    if how == "pool":  # a thread pool left open: Python's exit wakes and joins its idle worker
        global pool
        from concurrent.futures import ThreadPoolExecutor
        pool = ThreadPoolExecutor(1)
        pool.submit(print, "", end="")
run_and_exit(main)
"""


@pytest.mark.parametrize("how,status", [("return", 0), ("int", 3), ("str", 1), ("raise", 1), ("pool", 0)])
def test_a_command_ends_like_python_minus_the_teardown(tmp_path, how, status):
    # What run_and_exit skips is only the interpreter's teardown: threads joined, atexit run, output flushed, and
    # the status Python would give.
    out = subprocess.run([sys.executable, "-c", EXIT_PROGRAM, str(tmp_path), how], capture_output=True, text=True,
                         timeout=scaled(120), cwd=REPO)
    assert out.returncode == status, out.stderr[-2000:]
    assert out.stdout == "buffered, no newline"
    assert (tmp_path / "atexit").read_text() == "ran" and (tmp_path / "thread").read_text() == "joined"
    if how == "str":
        assert out.stderr.strip() == "a message"
    if how == "raise":
        assert "ValueError: boom" in out.stderr


def test_output_a_command_could_not_write_is_status_120_as_pythons(tmp_path):
    program = "from gradsweep.shutdown import run_and_exit\nrun_and_exit(lambda: print('done', end=''))\n"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the output waits for the final flush
    with open("/dev/full", "w") as full:
        out = subprocess.run([sys.executable, "-c", program], stdout=full, stderr=subprocess.PIPE, text=True, env=env,
                             timeout=scaled(120), cwd=REPO)
    assert out.returncode == 120, out.stderr[-2000:]
    closed = subprocess.run(["bash", "-c", f"'{sys.executable}' -c \"{program}\" >&-"], capture_output=True, text=True,
                            timeout=scaled(120), cwd=REPO)
    assert closed.returncode == 0, closed.stderr[-2000:]
