"""The package as a user installs it: a wheel (not this checkout), in a fresh virtual environment, run from
another directory."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import scaled

from gradsweep.engine.kernels.build import SOURCES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_installs_and_runs_the_quick_start_elsewhere(tmp_path):
    dist = tmp_path / "dist"
    # --no-build-isolation: built with this interpreter's setuptools, not one pip downloads into a throwaway env
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(ROOT)], check=True,
                   capture_output=True, timeout=scaled(600))
    wheel = next(dist.glob("gradsweep-*.whl"))
    # The venv sees this interpreter's packages (torch, hydra, ... already installed: no download), but gradsweep
    # itself comes from the wheel, not from the editable install of this checkout.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=scaled(300))
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True, timeout=scaled(600))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([str(python), "-c", "import gradsweep, gradsweep.sweep.preflight as p; print(gradsweep.__file__); "
                            "print(p.CONF_DIR)"], cwd=elsewhere, capture_output=True, text=True, check=True)
    module, conf = where.stdout.split()
    assert module.startswith(str(venv)) and conf.startswith(str(venv)), where.stdout
    assert (Path(conf) / "config.yaml").is_file() and (Path(conf) / "hydra" / "help" / "gradsweep.yaml").is_file()
    kernel = subprocess.run([str(python), "-c", "import hashlib, gradsweep.engine.kernels.build as s; "
                             "print(hashlib.sha256(s.source()).hexdigest())"],
                            cwd=elsewhere, capture_output=True, text=True, check=True)
    csrc = ROOT / "gradsweep" / "engine" / "kernels" / "csrc"
    shipped = hashlib.sha256(b"\n".join((csrc / n).read_bytes() for n in SOURCES)).hexdigest()
    assert kernel.stdout.strip() == shipped  # the compiled engine's kernel source ships in the wheel
    sweep = elsewhere / "sweep"
    run = subprocess.run([str(venv / "bin" / "gradsweep"), "-m", "model.depth=2,10,30", "init=xavier,kaiming",
                          "train.steps=20", "quiet=true", f"hydra.sweep.dir={sweep}"], cwd=elsewhere, capture_output=True,
                         text=True, timeout=scaled(600))
    assert run.returncode == 0, run.stderr[-2000:]
    assert "6 runs in" in run.stdout and "jobs fused" in run.stdout  # the packaged launcher plugin was found
    report = subprocess.run([str(python), "-m", "gradsweep.report", str(sweep), "--quiet"], cwd=elsewhere,
                            capture_output=True, text=True, timeout=scaled(600))
    assert report.returncode == 0, report.stderr[-2000:]
    assert (sweep / "report" / "index.html").is_file()
