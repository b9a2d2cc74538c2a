#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before scripts/gpu_check.sh: the lent GPU image (Python 3.12, torch,
# pandas, pyarrow, seaborn, tqdm, pytest) has no Hydra and reaches no registry, so Hydra travels as wheels in
# .whl/ (git-excluded, carried with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform any -d .whl "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3,<2.4"
python3 -m pip wheel --no-deps -w .whl "antlr4-python3-runtime==4.9.3"  # sdist only on PyPI: built here
ls -la .whl
