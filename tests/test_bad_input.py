"""Bad input, end to end, across the runner, the report and the tuner: each case gets one line on stderr naming
the cause, a non-zero exit, and leaves every existing good output byte for byte as it was."""

from __future__ import annotations

import hashlib
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import scaled

pytestmark = pytest.mark.slow  # every case is a command run in a subprocess

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    """A good fused sweep and a good tune study, which no bad input may touch."""
    root = tmp_path_factory.mktemp("good")
    subprocess.run([sys.executable, "-m", "gradsweep", "-m", "model.depth=2,3", "optim.lr=0.01,0.02", "train.steps=5",
                    "quiet=true", f"hydra.sweep.dir={root / 'sweep'}"], check=True, capture_output=True, cwd=root)
    subprocess.run([sys.executable, "-m", "gradsweep.report", str(root / "sweep"), "--quiet"], check=True,
                   capture_output=True, cwd=root)
    subprocess.run([sys.executable, "-m", "gradsweep.tune", "model.depth=2", "train.steps=5", "tune.n_trials=2",
                    "quiet=true", f"tune.out_dir={root / 'tuned'}"], check=True, capture_output=True, cwd=root)
    return root


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _copy_sweep(good: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(good / "sweep", tmp / "sweep"))


def _corrupt_runs(good: Path, tmp: Path) -> list[str]:
    sweep = _copy_sweep(good, tmp)
    next((sweep / "groups").glob("*/runs.parquet")).write_bytes(b"PAR1 this is not parquet")
    (sweep / "runs-index.parquet").unlink(missing_ok=True)
    return [str(sweep)]


def _truncated_steps(good: Path, tmp: Path) -> list[str]:
    sweep = _copy_sweep(good, tmp)
    for f in (sweep / "groups").glob("*/steps.parquet"):
        f.write_bytes(f.read_bytes()[: 200])
    return [str(sweep)]


def _older_schema(good: Path, tmp: Path) -> list[str]:
    sweep = _copy_sweep(good, tmp)
    (sweep / "runs-index.parquet").unlink(missing_ok=True)
    for f in (sweep / "groups").glob("*/runs.parquet"):
        t = pq.read_table(f)
        pq.write_table(t.drop_columns(["verdict", "grad_ratio_log10"]), f)
    return [str(sweep)]


def _schema_1(good: Path, tmp: Path) -> list[str]:
    """Every column there, but written before verdicts described the whole run (no schema version recorded)."""
    sweep = _copy_sweep(good, tmp)
    (sweep / "runs-index.parquet").unlink(missing_ok=True)
    for f in (sweep / "groups").glob("*/runs.parquet"):
        pq.write_table(pq.read_table(f).replace_schema_metadata(None), f)
    return [str(sweep)]


def _empty_dir(good: Path, tmp: Path) -> list[str]:
    (tmp / "empty").mkdir()
    return [str(tmp / "empty")]


def _journal_dir(good: Path, tmp: Path) -> list[str]:
    (tmp / "adir").mkdir()
    return [f"tune.storage={tmp / 'adir'}", "tune.n_trials=1", "quiet=true"]


def _foreign_journal(good: Path, tmp: Path) -> list[str]:
    (tmp / "notes.txt").write_text("my notes\nmore notes\n")
    return [f"tune.storage={tmp / 'notes.txt'}", "tune.n_trials=1", "quiet=true"]


def _fixed(*argv: str) -> Callable[[Path, Path], list[str]]:
    return lambda good, tmp: [a.replace("{good}", str(good)).replace("{tmp}", str(tmp)) for a in argv]


RUN, REPORT, TUNE = "gradsweep", "gradsweep.report", "gradsweep.tune"
CASES = [
    # the runner: keys, types, ranges, choices, combinations, unwritable output
    (RUN, _fixed("model.activation=swish"), "model.activation='swish' is not valid; valid values: sigmoid"),
    (RUN, _fixed("init=he"), "init='he' is not valid; valid values: default"),
    (RUN, _fixed("model.depth=-3"), "model.depth=-3 is not valid"),
    (RUN, _fixed("optim.lr=fast"), "optim.lr='fast' is not valid; it must be a number"),
    (RUN, _fixed("train.clip_norm=-1"), "train.clip_norm=-1.0 is not valid"),
    (RUN, _fixed("model.bogus=1"), "model.bogus is not a known key; valid keys: model.depth"),
    (RUN, _fixed("-m", "model.depth=2,0", "hydra.sweep.dir={tmp}/s"), "model.depth=0 is not valid"),
    (RUN, _fixed("loss=cross_entropy"), "loss='cross_entropy' is not valid with data=regression"),
    (RUN, _fixed("model.depth=2,10"), "model.depth=2,10 is a sweep, which needs -m: python -m gradsweep -m model.depth=2,10"),
    (RUN, _fixed("data=digits", "data.n_test=1797"), "data.n_test=1797 is not valid"),
    (RUN, _fixed("data.n_samples=1"), "data.n_samples=1 is not valid; it must be an integer >= 2"),
    (RUN, _fixed("-m", "model=cnn", "data=digits,regression", "hydra.sweep.dir={tmp}/s"),
     "model=cnn is not valid with data=regression: its 1 feature(s) have no image shape; valid data: digits (8x8)"),
    (RUN, _fixed("model=cnn", "data=gaussian"), "model=cnn is not valid with data=gaussian"),
    (RUN, _fixed("data=gaussian", "data.n_features=4"),
     "data.n_features is not a key of the chosen data preset; its keys: python -m gradsweep data=<preset> --help"),
    (RUN, _fixed("-m", "+model.depth=3,4", "hydra.sweep.dir={tmp}/s"),
     "+model.depth appends a key the config lacks, and model.depth is in it already: drop the + (model.depth=3,4)"),
    (TUNE, _fixed("-m", "model.depth=10", "tune.out_dir={tmp}/t"), "-m: gradsweep.tune takes no -m or other flags"),
    (RUN, _fixed("-m", "+experiment=dropout", "hydra.sweep.dir={tmp}/s"), "experiment='dropout' is not valid"),
    (RUN, _fixed("-m", "optim.lr=0.1", "hydra.sweep.dir=/proc/gradsweep-test"),
     "hydra.sweep.dir='/proc/gradsweep-test' is not writable"),
    (RUN, _fixed("hydra.run.dir=/sys/fs/gradsweep-test"), "hydra.run.dir='/sys/fs/gradsweep-test' is not writable"),
    # the report: missing, empty, torn, truncated, older, bad options, unwritable output
    (REPORT, _fixed("{tmp}/nowhere"), "nowhere: no such directory"),
    (REPORT, _empty_dir, "no gradsweep runs found"),
    (REPORT, _corrupt_runs, "a runs table cannot be read"),
    (REPORT, _truncated_steps, "a steps table cannot be read"),
    (REPORT, _older_schema, "was written by an older gradsweep (no verdict, grad_ratio_log10"),
    (REPORT, _schema_1, "was written by an older gradsweep (tables schema 1, this version reads 2"),
    (REPORT, _fixed("{good}/sweep", "--stat", "loss"), "argument --stat: invalid choice: 'loss'"),
    (REPORT, _fixed("{good}/sweep", "--run", "0123456789abcdef", "--out", "{tmp}/r"), "--run '0123456789abcdef' is not a run"),
    (REPORT, _fixed("{good}/sweep", "--x", "model.colour", "--out", "{tmp}/r"), "model.colour"),
    (REPORT, _fixed("{good}/sweep", "--out", "/proc/gradsweep-report"), "cannot write the report to /proc/gradsweep-report"),
    # the tuner
    (TUNE, _fixed("tune.lr_min=10", "quiet=true"), "tune.lr_min=10.0 is not valid; it must be a number < tune.lr_max"),
    (TUNE, _fixed("tune.n_trials=0"), "tune.n_trials=0 is not valid"),
    (TUNE, _fixed("tune.sampler=annealing"), "tune.sampler='annealing' is not valid; valid values: tpe"),
    (TUNE, _fixed("tune.storage=postgresql+psycopg://me:secret@127.0.0.1:9/db"), "is not reachable"),
    (TUNE, _journal_dir, "is not a file"),
    (TUNE, _foreign_journal, "is not an Optuna journal"),
    (TUNE, _fixed("tune.out_dir=/proc/gradsweep-tune", "tune.n_trials=1"), "cannot be opened"),
    (TUNE, _fixed("tune.study_name=''"), "tune.study_name='' is not valid"),
    (TUNE, _fixed("tune.stale_after_s=0"), "tune.stale_after_s=0.0 is not valid; it must be a number of seconds > 0"),
    (TUNE, _fixed("tune.safety=0.5"), "tune.safety=0.5 is not valid; it must be a number >= 1"),
    (RUN, _fixed("verdict.stall_margin=1"), "verdict.stall_margin=1.0 is not valid; it must be a number >= 0 and < 1"),
]


@pytest.mark.parametrize(("tool", "argv", "words"), CASES, ids=[f"{c[0]}: {c[2][:40]}" for c in CASES])
def test_bad_input(good, tmp_path, monkeypatch, capsys, tool, argv, words):
    """In process, through each command's own main() (the same code `python -m <tool>` runs)."""
    import importlib

    before = _digest(good)
    args = argv(good, tmp_path) + (["--quiet"] if tool == REPORT else [])  # no progress bar on stderr
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module("gradsweep.sweep.cli" if tool == RUN else tool).main
    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert exit_.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"{tool}: error: ") and words in lines[0], err
    assert "secret" not in err
    assert _digest(good) == before
    assert not (tmp_path / "s").exists()  # a refused sweep leaves no directory


def _full_disk() -> None:  # in the child: files may not grow past 16 kB, and writing past it raises instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def test_a_full_disk_fails_the_runs_in_one_line(good, tmp_path):
    before = _digest(good)
    r = subprocess.run([sys.executable, "-m", "gradsweep", "-m", "optim.lr=0.01,0.02", "train.steps=300", "quiet=true",
                        f"hydra.sweep.dir={tmp_path / 'full'}"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=scaled(300), preexec_fn=_full_disk)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1, r.stderr
    assert len(lines) == 1 and lines[0].startswith("gradsweep: error: 2 of 2 runs failed") and "File too large" in lines[0]
    assert not list((tmp_path / "full").rglob("runs.parquet"))  # nothing half-written passes for a run
    assert _digest(good) == before


def _user_namespaces() -> bool:
    """Whether this machine lets an unprivileged process mount a tmpfs of its own (a user + mount namespace)."""
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _user_namespaces(), reason="no user namespaces here to mount a tmpfs (the RLIMIT_FSIZE test stands in)")
def test_a_full_tmpfs_fails_the_runs_in_one_line_and_spares_the_good_sweep(good, tmp_path):
    """A real full disk: a tmpfs holding a copy of a good sweep and 160 kB more, which a second sweep fills."""
    size_kb = sum(p.stat().st_size for p in (good / "sweep").rglob("*") if p.is_file()) // 1024 + 160
    script = textwrap.dedent(f"""\
        set -u
        mount -t tmpfs -o size={size_kb}k tmpfs {tmp_path}/disk
        cp -a {good}/sweep {tmp_path}/disk/good
        digest() {{ (cd {tmp_path}/disk/good && find . -type f -exec sha256sum {{}} + | sort); }}
        digest > {tmp_path}/before.txt
        {sys.executable} -m gradsweep -m optim.lr=0.01,0.02 train.steps=300 quiet=true \\
            hydra.sweep.dir={tmp_path}/disk/full 2> {tmp_path}/stderr.txt > /dev/null
        echo $? > {tmp_path}/rc.txt
        digest > {tmp_path}/after.txt
        find {tmp_path}/disk/full -name runs.parquet > {tmp_path}/committed.txt
        """)
    (tmp_path / "disk").mkdir()
    subprocess.run(["unshare", "-rm", "bash", "-c", script], check=True, timeout=scaled(300), cwd=tmp_path)
    stderr = (tmp_path / "stderr.txt").read_text()
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert (tmp_path / "rc.txt").read_text().strip() == "1", stderr
    assert len(lines) == 1 and lines[0].startswith("gradsweep: error: 2 of 2 runs failed"), stderr
    assert "No space left on device" in lines[0] and "the others are complete" not in lines[0]
    assert (tmp_path / "before.txt").read_text() == (tmp_path / "after.txt").read_text()
    assert (tmp_path / "before.txt").read_text().count("parquet") >= 4
    assert (tmp_path / "committed.txt").read_text() == ""  # no group committed: a rerun trains both runs again
