#!/usr/bin/env bash
# One call on a lent GPU machine: the CUDA tests, the numeric tests on CUDA's torch, then the benchmark
# (stacked throughput and the end-to-end fused vs basic sweep). Prepare first, here: scripts/gpu_wheels.sh.
#   device run: command "bash scripts/gpu_check.sh", carry [".whl"]   (logs under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m pip install -q --no-index --find-links .whl hydra-core omegaconf antlr4-python3-runtime 2>&1 | tail -2
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -2
python3 -c "import torch, hydra; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'hydra', hydra.__version__)" \
  | tee -a "$OUT/gpu.txt"
timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_train.py tests/test_model.py tests/test_compiled.py 2>&1 \
  | tee "$OUT/tests.txt" | tail -5
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_modules.py -m "not slow" 2>&1 | tee "$OUT/modules.txt" | tail -3
timeout 120 python3 -m gradsweep.bench --device cuda --group 1000 --steps 200 --sweep-steps 200 --basic-runs 10 \
  --out "$OUT/sweeps" 2>&1 | tee "$OUT/bench.txt"
rm -rf "$OUT/sweeps"
timeout 150 python3 scripts/bench_peers.py --device cuda --rounds 2 2>&1 | tee "$OUT/peers.txt"
